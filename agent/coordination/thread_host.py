"""Where the coordinator's loops run (a mixin of ``Coordinator``): in the caller's event
loop, or in a thread of their own with their own loop, so that work blocking the caller
(imports, synchronous drivers) never delays a lease renewal."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable

from agent.coordination.takeover import until


class ThreadHost:
    """Methods of ``Coordinator``: ``run`` calls its ``_run``."""

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; close the etcd and database connections.

        ``threaded``: the loops run in a thread of their own, with their own event
        loop, so that work blocking the caller's loop (imports, synchronous
        drivers) never delays a lease renewal; ``role_changed()`` and
        ``wait_decided()`` are still awaited in the caller's loop."""
        if not self.threaded:
            await self._run(stop)
            return
        self._caller = asyncio.get_running_loop()
        done = threading.Event()
        thread = threading.Thread(
            target=self._thread_main, args=(done,), name=f"coordinator-{self.region}", daemon=True
        )
        thread.start()
        try:
            await stop.wait()
        finally:
            done.set()
            await asyncio.to_thread(thread.join)

    def _thread_main(self, done: threading.Event) -> None:
        async def main() -> None:
            stop = asyncio.Event()

            async def stopped() -> bool:
                return done.is_set()

            async def watch() -> None:
                await until(stopped, 0.05)
                stop.set()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(watch())
                await self._run(stop)

        try:
            asyncio.run(main())
        except Exception as exc:  # the thread's end is logged; the lease then expires
            self.log.error("coordinator thread failed", error=f"{type(exc).__name__}: {exc}")

    def _signal(self, event: asyncio.Event) -> None:
        """Set an event the caller awaits, from whichever thread runs the loops."""
        if self._caller is not None:
            self._caller.call_soon_threadsafe(event.set)
        else:
            event.set()

    async def _every(
        self, interval: float, job: Callable[[], Awaitable[object]], stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await job()
            except Exception as exc:  # one loop for every job: a failed cycle is retried
                self._warn(
                    f"{getattr(job, '__name__', 'job')} failed", f"{type(exc).__name__}: {exc}"
                )
            with contextlib.suppress(TimeoutError):
                wait = max(0.0, interval - (time.monotonic() - started))
                async with asyncio.timeout(wait):
                    await stop.wait()
