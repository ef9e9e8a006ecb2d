"""The streams of an agent of a group: one set of tasks per partition owned, started and
stopped one partition at a time as ownership moves, the others left running.

``apply(owned)`` stops the partitions no longer owned (each finishes its current unit
within ``drain``, then is cancelled: cancelling is a crash for that partition, which
loses nothing, since a new owner resumes from what is durable in the vault), closes
their stores, then builds and starts the partitions newly owned (all at once), each at
its own epoch. A stop takes at most ``drain + 2 * settle``: the partition has no owner
meanwhile, so the daemon keeps that well under a membership TTL.
Only after ``apply`` returns may the member give up the keys of what it stopped
(``GroupMember.released``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from agent.supervise import StreamTask
from replicators import logs

Build = Callable[[dict[str, int], AsyncExitStack], Awaitable[list[StreamTask]]]
Run = Callable[[StreamTask, asyncio.Event], Awaitable[None]]


@dataclass
class _Running:
    epoch: int
    tasks: list[StreamTask]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stack: AsyncExitStack = field(default_factory=AsyncExitStack)
    jobs: list[asyncio.Task[None]] = field(default_factory=list)


class PartitionRunner:
    """``build(owned, stack)``: the tasks of the partitions ``owned`` (name -> epoch),
    their stores opened on ``stack``; ``run(task, stop)``: one task until ``stop``."""

    def __init__(self, build: Build, run: Run, drain: float, settle: float = 1.0) -> None:
        self.build = build
        self.run = run
        self.drain = drain
        self.settle = settle
        """How long a cancelled task, then the closing of the stores, may take each."""
        self.running: dict[str, _Running] = {}
        self.stuck: list[asyncio.Future[object]] = []
        """Tasks that ignored their cancellation (logged with where they wait)."""
        self.log = logs.get("group")

    @property
    def tasks(self) -> list[StreamTask]:
        return [t for name in sorted(self.running) for t in self.running[name].tasks]

    async def apply(self, owned: dict[str, int], *, at_once: bool = False) -> None:
        """Run exactly the partitions ``owned``, each at its epoch (a partition whose epoch
        changed is restarted). ``at_once``: cancel what stops, without a drain."""
        gone = [p for p, r in self.running.items() if owned.get(p) != r.epoch]
        await asyncio.gather(*(self._stop(p, at_once) for p in gone))
        new = [(p, e) for p, e in sorted(owned.items()) if p not in self.running]
        started = await asyncio.gather(*(self._start(p, e) for p, e in new), return_exceptions=True)
        errors = [r for r in started if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def _start(self, part: str, epoch: int) -> None:
        r = _Running(epoch, [])
        try:
            r.tasks = await self.build({part: epoch}, r.stack)
        except BaseException:
            await r.stack.aclose()
            raise
        r.jobs = [asyncio.create_task(self.run(t, r.stop), name=t.name) for t in r.tasks]
        self.running[part] = r
        self.log.info("partition started", partition=part, epoch=epoch, tasks=len(r.tasks))

    async def _stop(self, part: str, at_once: bool) -> None:
        r = self.running.pop(part)
        r.stop.set()
        if r.jobs and not at_once:
            _, pending = await asyncio.wait(r.jobs, timeout=self.drain)
        else:
            pending = set(r.jobs)
        for job in pending:
            job.cancel()
        stuck: set[asyncio.Task[None]] = set()
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=self.settle)
        if stuck:
            # a task that ignores its cancellation: say where it waits, and go on (the
            # partition's epoch fences whatever it may still write); its stores stay open
            for job in stuck:
                where = _awaiting(job)
                self.log.error("a stream of the partition did not stop", partition=part,
                               task=job.get_name(), waiting_in=where)  # fmt: skip
            self.stuck += stuck
        for job in set(r.jobs) - stuck:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await job
        if not stuck:
            closing = asyncio.ensure_future(r.stack.aclose())
            _, late = await asyncio.wait([closing], timeout=self.settle)
            if late:  # its stores did not close: say where, go on (the epoch fences it)
                self.log.error("closing the partition's stores did not end", partition=part,
                               waiting_in=_awaiting(closing))  # fmt: skip
                self.stuck.append(closing)
        self.log.info("partition stopped", partition=part, cancelled=len(pending))

    async def aclose(self) -> None:
        await self.apply({})

    def failed(self) -> BaseException | None:
        """The first error a partition's task ended with (a task only ends on stop)."""
        for r in self.running.values():
            for job in r.jobs:
                if job.done() and not job.cancelled() and job.exception() is not None:
                    return job.exception()
        return None


def _awaiting(task: asyncio.Future[object]) -> str:
    """Where a suspended task waits: its chain of awaits, outermost first."""
    out, coro = [], task.get_coro() if isinstance(task, asyncio.Task) else None
    while coro is not None and len(out) < 20:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            out.append(type(coro).__name__)
            break
        out.append(
            f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
        )
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " > ".join(out)
