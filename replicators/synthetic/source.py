"""The generator: record ``i`` is due at ``t0 + (i - first) / rate``."""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

from replicators.stream import Change
from replicators.synthetic.options import SyntheticOptions
from replicators.synthetic.records import KIND, make_record


class SyntheticSource:
    """Generates record ``i`` at ``t0 + (i - first) / rate``; its source time is when it was due."""

    KIND: ClassVar[str] = KIND

    def __init__(self, options: SyntheticOptions) -> None:
        self.options = options
        self._next = 0
        self._first = 0
        self._returned = 0
        self._t0 = time.time()

    def pending_since(self) -> float | None:
        """Source time of the oldest due record not yet handed out in a batch."""
        due = self._due(self._returned)
        return due if due <= time.time() else None

    def _due(self, index: int) -> float:
        return self._t0 + (index - self._first) / self.options.rate

    async def resume(self, position: int) -> None:
        self._next = self._first = self._returned = position
        self._t0 = time.time()

    async def next_batch(self, max_bytes: int, max_age: float, stop: asyncio.Event) -> list[Change]:
        """All records already due (a backlog ships at once), then more until ``max_age``."""
        batch: list[Change] = []
        size = 0
        opts = self.options
        while not stop.is_set():
            now = time.time()
            while size < max_bytes and self._due(self._next) <= now:
                due = self._due(self._next)
                record = make_record(self._next, due, opts.record_size, opts.compressible)
                batch.append(Change(record, self._next, self._next + 1, due))
                self._next += 1
                size += len(record)
            if size >= max_bytes or (batch and now >= batch[0].source_time + max_age):
                break
            wake = self._due(self._next)
            if batch:
                wake = min(wake, batch[0].source_time + max_age)
            await _sleep_or_stop(wake - now, stop)
        self._returned = self._next
        return batch

    async def ack(self, position: int) -> None:
        """Nothing to release: the generator keeps no history."""

    async def aclose(self) -> None:
        pass


async def _sleep_or_stop(delay: float, stop: asyncio.Event) -> None:
    try:
        async with asyncio.timeout(max(0.0, delay)):
            await stop.wait()
    except TimeoutError:
        pass
