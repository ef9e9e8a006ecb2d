"""A watch on the agent's event loop from a thread of its own: when the loop has not run
a callback for ``after`` seconds (something in it blocks: a synchronous call, a lock, a
child that never execs), the stack the loop's thread is in is logged, once per stall,
and again how long the stall lasted when the loop turns again.

Nothing in the loop can report that it is blocked: only another thread can see it. The
stack says where, which is what an operator (or a developer) needs to find the cause.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback

from replicators import logs

AFTER = 3.0
"""Seconds without a turn of the loop before the stall is logged."""


class LoopWatch:
    """``start()`` from inside the loop to watch; ``stop()`` ends the thread."""

    def __init__(self, after: float = AFTER, every: float = 0.5) -> None:
        self.after = after
        self.every = every
        self.stalls = 0
        self.longest = 0.0
        self._seen = time.monotonic()
        self._done = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._thread: threading.Thread | None = None
        self.log = logs.get("loop")

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._seen = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="loop-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.every)

    def _turned(self) -> None:
        self._seen = time.monotonic()

    def _watch(self) -> None:
        loop = self._loop
        assert loop is not None
        stalled_since: float | None = None
        while not self._done.wait(self.every):
            try:
                loop.call_soon_threadsafe(self._turned)
            except RuntimeError:  # the loop is closed
                return
            quiet = time.monotonic() - self._seen
            if quiet > self.after + self.every and stalled_since is None:
                stalled_since = self._seen
                self.stalls += 1
                self.log.error(
                    "event loop blocked",
                    seconds=round(quiet, 1),
                    stack=self._stack(),
                )
            elif stalled_since is not None and quiet <= self.every * 2:
                lasted = self._seen - stalled_since
                self.longest = max(self.longest, lasted)
                self.log.warning("event loop runs again", blocked_seconds=round(lasted, 1))
                stalled_since = None

    def _stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return "(no frame)"
        lines = traceback.format_stack(frame, limit=25)
        return "".join(lines[-25:])
