"""The reconcile scan: the listing compared with the ``ShippedIndex``, page by page.

A scan walks the bucket in key order one listing page (≤ 1000 keys) per
``step()``, interleaved with capture, and reads the next page while the
capture works through this one: memory stays bounded by two pages and the
scan resumes where it stood between batches. Each page is merged
with the index rows of the same key range: a key listed but not shipped (or
shipped with another etag, size or time) is queued as changed at its
LastModified; a key whose shipped state was read within its LastModified
second is queued to be read again (see ``index.SETTLE_NS``: a same-second
rewrite of its metadata lists the same); a key shipped but no longer listed
is queued as deleted. The next scan starts ``interval`` seconds after one
ends; a restarted source (or lost events) start one at once, or right after
the running one if a scan is under way.

``covered`` is the wall time at which the last complete scan began: every
change made before it was then queued or found shipped (the source's
``head()`` rests on it). A scan that fails proves nothing and is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from replicators.bucket import Bucket, ObjectState
from replicators.objects.index import ShippedIndex
from replicators.objects.queue import ChangeQueue


class Scanner:
    def __init__(
        self, bucket: Bucket, index: ShippedIndex, queue: ChangeQueue, interval: float
    ) -> None:
        self.bucket = bucket
        self.index = index
        self.queue = queue
        self.interval = interval
        self.due = time.monotonic() + interval
        self.scans = 0
        self.covered: float | None = None
        self._began = 0.0
        self._again = False
        self._pages: AsyncIterator[list[ObjectState]] | None = None
        self._next: asyncio.Task[list[ObjectState] | None] | None = None
        self._cursor: str | None = None

    def start_now(self) -> None:
        """Scan at once; if a scan is running, scan again as soon as it ends."""
        self.due = time.monotonic()
        self._again = self.running

    async def restart(self) -> None:
        """Drop any scan under way and forget what earlier scans proved; scan at once."""
        pages, self._pages, self._cursor = self._pages, None, None
        await self._drop_next()
        if pages is not None and hasattr(pages, "aclose"):
            with contextlib.suppress(Exception):
                await pages.aclose()  # type: ignore[attr-defined]
        self.covered, self._again = None, False
        self.due = time.monotonic()

    def pending_since(self) -> float | None:
        return None

    @property
    def running(self) -> bool:
        return self._pages is not None

    def page_ready(self) -> bool:
        """A scan is running and its next page has been read (``step`` will not wait)."""
        return self._next is not None and self._next.done()

    async def step(self) -> bool:
        """Scan one page if a scan is due or running; False when there was nothing to do.
        The page after it is read meanwhile (at most two pages in memory)."""
        if self._pages is None:
            if time.monotonic() < self.due:
                return False
            self._began = time.time()
            self._pages = aiter(self.bucket.scan())
            self._cursor = None
        if self._next is None:
            self._next = asyncio.ensure_future(self._read_page(self._pages))
        try:
            page = await self._next
        except BaseException:
            self._next = None
            self._pages = self._cursor = None  # a failed scan is not resumed, nor complete
            raise
        if page is None:
            self._next = None
            self._finish(None)
            return True
        self._next = asyncio.ensure_future(self._read_page(self._pages))
        if page:
            self._compare(page)
            self._cursor = page[-1].key
        return True

    @staticmethod
    async def _read_page(pages: AsyncIterator[list[ObjectState]]) -> list[ObjectState] | None:
        try:
            return await anext(pages)
        except StopAsyncIteration:
            return None

    async def _drop_next(self) -> None:
        task, self._next = self._next, None
        if task is not None:
            task.cancel()
            # waited, not awaited: its end is not ours (a cancellation of the caller goes on)
            await asyncio.wait([task])

    def _compare(self, page: list[ObjectState]) -> None:
        shipped = {e.key: e for e in self.index.between(self._cursor, page[-1].key)}
        now = time.time()
        for obj in page:
            e = shipped.pop(obj.key, None)
            if e is None or (e.etag, e.size, e.time_ns) != (obj.etag, obj.size, obj.time_ns):
                self.queue.add(obj.key, obj.time_ns / 1e9)
            elif not e.settled:  # a same-second rewrite would list the same: read it again
                self.queue.add(obj.key, now)
        for key in shipped:
            self.queue.add(key, now)

    def _finish(self, _: None) -> None:
        now = time.time()
        for e in self.index.between(self._cursor, None):
            self.queue.add(e.key, now)
        self._pages = None
        self._cursor = None
        self.scans += 1
        self.covered = self._began
        self.due = time.monotonic() + (0.0 if self._again else self.interval)
        self._again = False
