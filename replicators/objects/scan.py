"""The reconcile scan: the listing compared with the ``ShippedIndex``, page by page.

A scan takes the bucket's listing one page (≤ 1000 keys) per ``step()``,
interleaved with capture. The listing is the bucket's ``SharedListing``
(``listing.py``): one for every scan of the bucket in this process (the
partitions a member owns), which reads pages ahead while the capture works
through this one; memory stays bounded by a few pages and the scan resumes
where it stood between batches. Each page (a key range) is merged
with the index rows of the same key range: a key listed but not shipped (or
shipped with another etag, size or time) is queued as changed at its
LastModified; a key whose shipped state was read within its LastModified
second is queued to be read again (see ``index.SETTLE_NS``: a same-second
rewrite of its metadata lists the same); a key shipped but no longer listed
is queued as deleted. The next scan starts ``interval`` seconds after one
ends; a restarted source (or lost events) start one at once, or right after
the running one if a scan is under way.

``covered`` is the wall time at which the last complete scan began (the
earliest of its LIST requests: a shared listing's page may have been asked
for before the scan subscribed): every change made before it was then queued
or found shipped (the source's ``head()`` rests on it). A scan that fails
proves nothing and is dropped.
"""

from __future__ import annotations

import time

from replicators.bucket import Bucket
from replicators.objects.index import ShippedIndex
from replicators.objects.listing import Done, Failed, Page, Subscription, shared_listing
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
        self._sub: Subscription | None = None

    def start_now(self) -> None:
        """Scan at once; if a scan is running, scan again as soon as it ends."""
        self.due = time.monotonic()
        self._again = self.running

    async def restart(self) -> None:
        """Drop any scan under way and forget what earlier scans proved; scan at once."""
        self._drop()
        self.covered, self._again = None, False
        self.due = time.monotonic()

    def close(self) -> None:
        """Leave a scan under way (the source closes)."""
        self._drop()

    def pending_since(self) -> float | None:
        return None

    @property
    def running(self) -> bool:
        return self._sub is not None

    def page_ready(self) -> bool:
        """A scan is running and its next page has been read (``step`` will not wait)."""
        return self._sub is not None and self._sub.ready()

    async def step(self) -> bool:
        """Take the next page of the bucket's shared listing (``listing.py``) if a scan is
        due or running; False when there was nothing to do."""
        if self._sub is None:
            if time.monotonic() < self.due:
                return False
            self._began = time.time()
            self._sub = shared_listing(self.bucket.cfg).subscribe()
        try:
            item = await self._sub.next()
        except BaseException:
            self._drop()  # a scan cut short is not resumed, nor complete
            raise
        if isinstance(item, Failed):
            self._drop()
            raise item.error
        if isinstance(item, Done):
            self._finish()
            return True
        self._began = min(self._began, item.listed_at)
        if isinstance(item, Page):
            self._compare(item)
        else:  # the end of a pass: the rows after its last key are gone from the bucket
            now = time.time()
            for e in self.index.between(item.after, None):
                self.queue.add(e.key, now)
        return True

    def _drop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            sub.close()

    def _compare(self, page: Page) -> None:
        last = page.states[-1].key
        shipped = {e.key: e for e in self.index.between(page.after, last)}
        accept, now = self.queue.accept, time.time()
        for obj in page.states:
            if accept is not None and not accept(obj.key):
                continue  # another partition's (its index holds none of them)
            e = shipped.pop(obj.key, None)
            if e is None or (e.etag, e.size, e.time_ns) != (obj.etag, obj.size, obj.time_ns):
                self.queue.add(obj.key, obj.time_ns / 1e9)
            elif not e.settled:  # a same-second rewrite would list the same: read it again
                self.queue.add(obj.key, now)
        for key in shipped:
            self.queue.add(key, now)

    def _finish(self) -> None:
        self._sub = None
        self.scans += 1
        self.covered = self._began
        self.due = time.monotonic() + (0.0 if self._again else self.interval)
        self._again = False
