"""The last apply before a promotion (agent.catchup) over supervised stream tasks.

The runners here are small in-process sinks whose vault is a list: what is
tested is how the supervisor's idle marks and the drain rule work together.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from agent.catchup import drain_sinks, replay_target
from agent.supervise import StreamTask, run_stream
from replicators.metrics import Metrics
from replicators.postgres.lsn import format_lsn
from replicators.progress import StreamProgress


class ListSink:
    """Applies one pending item per step; the applied end is its position."""

    def __init__(self, progress: StreamProgress, pending: list[int]) -> None:
        self.progress = progress
        self.pending = pending

    async def recover(self) -> None:
        pass

    async def sync_once(self, stop: asyncio.Event) -> int:
        if not self.pending:
            return 0
        await asyncio.sleep(0.01)
        position = self.pending.pop(0)
        self.progress.advance("applied", position, 0.0, 0.0)
        return 1


def task(kind: str, pending: list[int]) -> StreamTask:
    progress = StreamProgress(stream=kind, kind=kind, side="sink", peer="vault")
    return StreamTask(f"vault->{kind}", ListSink(progress, pending), progress, idle=0.05)


async def test_drain_waits_until_every_sink_applied_what_the_vault_holds() -> None:
    pg = task("postgres", [0x1000, 0x2000])
    objects = task("objects", [1, 2, 3, 4, 5, 6, 7, 8])
    stop = asyncio.Event()
    metrics = Metrics(CollectorRegistry())
    async with asyncio.TaskGroup() as tg:
        for t in (pg, objects):
            tg.create_task(run_stream(t, stop, metrics))
        await asyncio.sleep(0.2)  # both idle, nothing pending
        pg.runner.pending.extend([0x3000, 0x1_0000_0040])  # type: ignore[attr-defined]
        objects.runner.pending.extend(range(9, 40))  # type: ignore[attr-defined]
        async with asyncio.timeout(10):
            target = await drain_sinks(lambda: [pg, objects])
        assert objects.runner.pending == [] and pg.runner.pending == []  # type: ignore[attr-defined]
        assert target == "1/40" == format_lsn(0x1_0000_0040)
        stop.set()


def test_no_single_postgres_stream_no_target() -> None:
    assert replay_target([task("objects", [])]) is None
    a, b = task("postgres", []), task("postgres", [])
    assert replay_target([a]) is None  # nothing applied yet
    a.progress.advance("applied", 5, 0.0, 0.0)
    b.progress.advance("applied", 9, 0.0, 0.0)
    assert replay_target([a, b]) is None  # two clusters: their LSNs do not compare
    assert replay_target([a]) == "0/5"


async def test_a_halted_sink_does_not_hold_the_takeover() -> None:
    halted = task("postgres", [])
    halted.state = "halted"
    async with asyncio.timeout(2):
        assert await drain_sinks(lambda: [halted]) is None
