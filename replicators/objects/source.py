"""The active side: captures a bucket's changes into records.

Capture is driven by one ``ChangeQueue``, fed by filer events (``FilerTail``)
and by a resumable listing scan (``Scanner``). Each queued key is captured by
reading its *current* state: absent → a delete record (if the destination
holds it), unchanged since last shipped → nothing, small → one inline put,
large → a hash pass then its parts, one ranged ``If-Match`` read at a time
(never the whole object in memory), possibly across several batches. An
object that changes during its transfer is abandoned and queued again.

Positions are capture sequence numbers: record ``n`` covers ``[n, n+1)``.
``ack`` commits what became durable to the ``ShippedIndex``; a restarted
source starts with a full scan, which re-captures whatever was not durable.

``head()`` proves an idle bucket's RPO: whenever nothing is queued, read
ahead or in transfer, it records (next position, a time before which every
change was seen): the start of the last complete scan, or later, while the
filer subscription has run since before that scan, the time up to which its
events were read (``FilerTail.drained_at``). A failing or hung listing or
subscription adds nothing, and a restart forgets it all until a new scan ends.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from replicators import logs
from replicators.bucket import Bucket, ObjectState
from replicators.errors import AlreadyExists, NotFound
from replicators.objects import records as rec
from replicators.objects.index import Entry, ShippedIndex
from replicators.objects.options import ObjectsOptions
from replicators.objects.queue import ChangeQueue
from replicators.objects.scan import Scanner
from replicators.objects.sqs import SqsPoller
from replicators.objects.tail import FilerTail
from replicators.objects.webhook import S3Webhook
from replicators.stream import Change

log = logs.get("objects")
KIND = "objects"
IDLE_WAIT = 0.05
FETCH_AHEAD = 16


@dataclass
class Fetched:
    """A key read ahead of its turn: its state (None: absent) and its bytes if inline."""

    key: str
    since: float
    state: ObjectState | None
    body: bytes | None
    read_ns: int
    """Wall-clock time just before the read."""


@dataclass
class Transfer:
    """A large object being shipped in parts."""

    state: ObjectState
    head: rec.Head
    version: rec.Version
    count: int
    since: float
    read_ns: int
    index: int = 0

    def entry(self) -> Entry:
        s = self.state
        meta = rec.meta_fingerprint(s.content_type, dict(s.metadata))
        return Entry(s.key, s.etag, s.size, s.time_ns, self.head.content_hash, meta, self.read_ns)


class ObjectsSource:
    KIND: ClassVar[str] = KIND

    def __init__(
        self,
        options: ObjectsOptions,
        bucket: Bucket,
        state_dir: Path,
        *,
        accept: Callable[[str], bool] | None = None,
    ) -> None:
        """``accept``: if given, only keys for which it is True are captured (events and
        scan alike: a put or delete of any other key never makes a record)."""
        self.options = options
        self.bucket = bucket
        self.index = ShippedIndex(state_dir / "shipped.sqlite")
        self.queue = ChangeQueue(accept)
        self.scanner = Scanner(bucket, self.index, self.queue, options.scan_interval)
        self.tail: FilerTail | S3Webhook | SqsPoller | None = None
        bucket_name, prefix = options.source.bucket, options.source.prefix
        if options.events == "filer" and options.filer:
            self.tail = FilerTail(options.filer, bucket_name, prefix)
        elif options.events == "webhook":
            self.tail = S3Webhook(options.webhook, bucket_name, prefix)
        elif options.events == "sqs" and options.sqs:
            self.tail = SqsPoller(options.sqs, bucket_name, prefix)
        self._seq = 0
        self._inflight: list[tuple[int, str, Entry | None]] = []
        self._latest: dict[str, Entry | None] = {}
        self._transfer: Transfer | None = None
        self._ready: deque[Fetched] = deque()
        self._confirmed: list[Entry] = []
        self._head: tuple[int, float] | None = None

    # -- Source interface ---------------------------------------------------

    async def resume(self, position: int) -> None:
        self._seq = position
        self._inflight.clear()
        self._latest.clear()
        self._transfer = None
        self._ready.clear()
        self._confirmed.clear()
        self._head = None
        await self.scanner.restart()
        if isinstance(self.tail, SqsPoller):
            self.tail.forget()  # what was in flight is captured again: its messages return
        if self.tail is not None:
            await self.tail.start()

    def head(self) -> tuple[int, float] | None:
        """(position, at): every change made before ``at`` lies before ``position`` (see the
        module docstring; ``replicators.progress.Head``); None until the first proof."""
        return self._head

    def pending_since(self) -> float | None:
        times = [t for t in (self.queue.oldest(), self.scanner.pending_since()) if t]
        if self._transfer is not None:
            times.append(self._transfer.since)
        times += [f.since for f in self._ready]
        return min(times) if times else None

    def pending_counts(self) -> dict[str, int]:
        """Changes seen but not yet handed to the shipper: ``objects`` (queued, read ahead, in
        transfer) and ``bytes`` (known ones: read-ahead bodies and the rest of a transfer)."""
        objects = len(self.queue) + len(self._ready)
        size = sum(len(f.body) for f in self._ready if f.body is not None)
        if (t := self._transfer) is not None:
            objects += 1
            size += max(0, t.state.size - t.index * int(self.options.part_size))
        return {"objects": objects, "bytes": size}

    async def next_batch(self, max_bytes: int, max_age: float, stop: asyncio.Event) -> list[Change]:
        batch: list[Change] = []
        size = 0
        first = 0.0
        while not stop.is_set() and size < max_bytes:
            await self._drain_events()
            # the first record of a batch always fits, even one larger than max_bytes
            room = max_bytes - size if batch else sys.maxsize
            change = await self._next_change(room)
            if change is None and self.pending_since() is None:
                self._prove_head()
            if change is not None:
                if not batch:
                    first = time.time()
                batch.append(change)
                size += len(change.payload)
            if batch and time.time() >= first + max_age:
                break
            if change is not None:
                continue
            if not await self.scanner.step():
                await self._idle(stop)
        return batch

    async def ack(self, position: int) -> None:
        done = [(key, entry) for end, key, entry in self._inflight if end <= position]
        if done or self._confirmed:
            confirmed, self._confirmed = self._confirmed, []
            await asyncio.to_thread(self.index.commit, done, confirmed)
            self._inflight = [x for x in self._inflight if x[0] > position]
            for key, entry in done:
                if self._latest.get(key, 0) == entry:
                    del self._latest[key]
        if isinstance(self.tail, SqsPoller):
            self.tail.ack(position)  # its messages whose changes are now durable are deleted

    async def aclose(self) -> None:
        if self.tail is not None:
            await self.tail.stop()
        self.index.close()
        await self.bucket.aclose()

    # -- capture ------------------------------------------------------------

    async def _drain_events(self) -> None:
        if self.tail is None:
            return
        for hint in await self.tail.poll():
            self.queue.add(hint.key, hint.time or time.time())
        if self.tail.lost_events():
            await self.tail.start()  # subscribed again before the scan begins: nothing missed
            self.scanner.start_now()
        if isinstance(self.tail, SqsPoller):
            self.tail.settle(self._capturing, self._seq)

    def _capturing(self, key: str) -> bool:
        """``key`` is queued, read ahead or in transfer: a record of it may still come."""
        t = self._transfer
        return (
            key in self.queue
            or (t is not None and t.state.key == key)
            or any(f.key == key for f in self._ready)
        )

    def _prove_head(self) -> None:
        """Nothing seen is left to capture: record the head (see the module docstring)."""
        at = self.scanner.covered
        tail = self.tail
        if at is None:
            return
        if tail is not None and tail.since is not None and tail.since <= at:
            at = max(at, tail.drained_at or at)
        if self._head is None or at > self._head[1]:
            self._head = (self._seq, at)

    async def _idle(self, stop: asyncio.Event) -> None:
        if self._confirmed:
            confirmed, self._confirmed = self._confirmed, []
            await asyncio.to_thread(self.index.commit, (), confirmed)
        wait = [asyncio.ensure_future(stop.wait())]
        try:
            async with asyncio.timeout(IDLE_WAIT):
                await asyncio.wait(wait)
        except TimeoutError:
            pass
        finally:
            for task in wait:
                task.cancel()

    async def _next_change(self, room: int) -> Change | None:
        """The next record that fits in ``room`` bytes (or None: nothing ready / no room)."""
        if self._transfer is not None:
            if self.options.part_size + 4096 > room:
                return None
            return await self._next_part(self._transfer)
        if not self._ready:
            await self._fetch_some()
        while self._ready:
            got = self._ready[0]
            if got.body is not None and len(got.body) + 4096 > room:
                return None  # first in the next batch
            self._ready.popleft()
            change = await self._capture(got, room)
            if change is not None or self._transfer is not None:
                return change
        return None

    def _shipped(self, key: str) -> Entry | None:
        return self._latest[key] if key in self._latest else self.index.get(key)

    async def _fetch_some(self) -> None:
        """Read up to ``FETCH_AHEAD`` queued keys at once (one GET each), in queue order."""
        items = []
        while len(items) < FETCH_AHEAD and (item := self.queue.pop()) is not None:
            items.append(item)
        if not items:
            return
        inline_max = int(self.options.inline_max)

        async def fetch(key: str, since: float) -> Fetched:
            shipped = self._shipped(key)
            read_ns = time.time_ns()
            try:
                state, body = await self.bucket.fetch(
                    key, inline_max, shipped.etag if shipped else ""
                )
            except NotFound:
                return Fetched(key, since, None, None, read_ns)
            return Fetched(key, since, state, body, read_ns)

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(fetch(key, since)) for key, since in items]
        self._ready.extend(t.result() for t in tasks)

    async def _capture(self, got: Fetched, room: int) -> Change | None:
        key, since, state, body = got.key, got.since, got.state, got.body
        shipped = self._shipped(key)
        if state is None:
            if shipped is None:
                return None
            version = rec.Version(max(time.time_ns(), shipped.time_ns + 1), self._seq)
            return self._emit(rec.Delete(key, version), key, None, since)
        meta = rec.meta_fingerprint(state.content_type, dict(state.metadata))
        if shipped and (shipped.etag, shipped.size, shipped.time_ns, shipped.meta) == (
            state.etag,
            state.size,
            state.time_ns,
            meta,
        ):
            if not shipped.settled and key not in self._latest:
                confirmed = replace(shipped, checked_ns=got.read_ns)
                if confirmed.settled:  # the same state, read after its second: no rewrite hid
                    self._confirmed.append(confirmed)
            return None
        if state.size > self.options.inline_max:
            return await self._start_transfer(state, since, got.read_ns, room)
        if body is None:  # same etag as shipped, yet rewritten: read it
            try:
                body = await self.bucket.read(key, state.etag)
            except (AlreadyExists, NotFound):
                self.queue.add(key, since)  # changed under us: capture its newer state
                return None
        head = _head(state, rec.content_hash(body))
        version = rec.Version(state.time_ns, self._seq)
        entry = Entry(
            key, state.etag, state.size, state.time_ns, head.content_hash, meta, got.read_ns
        )
        return self._emit(rec.Put(key, version, head, body), key, entry, since)

    async def _start_transfer(
        self, state: ObjectState, since: float, read_ns: int, room: int
    ) -> Change | None:
        try:
            digest = await self.bucket.content_hash(state.key, state.etag)
        except (AlreadyExists, NotFound):
            self.queue.add(state.key, since)
            return None
        count = rec.part_count(state.size, int(self.options.part_size))
        version = rec.Version(state.time_ns, self._seq)
        self._transfer = Transfer(state, _head(state, digest), version, count, since, read_ns)
        self.queue.hold(state.key)
        if self.options.part_size + 4096 > room:
            return None
        return await self._next_part(self._transfer)

    async def _next_part(self, t: Transfer) -> Change | None:
        part_size = int(self.options.part_size)
        offset = t.index * part_size
        key = t.state.key
        try:
            body = await self.bucket.read(
                key, t.state.etag, offset, min(offset + part_size, t.state.size)
            )
        except (AlreadyExists, NotFound):
            log.info("object changed during its transfer; capturing it again", key=key)
            self._transfer = None
            self.queue.release(key)
            self.queue.add(key, t.since)
            return None
        record = rec.Part(key, t.version, t.head, t.index, t.count, offset, body)
        t.index += 1
        entry = None
        if record.last:
            self._transfer = None
            self.queue.release(key)
            entry = t.entry()
        return self._emit(record, key, entry, t.since, final=record.last)

    def _emit(
        self, record: rec.Record, key: str, entry: Entry | None, since: float, final: bool = True
    ) -> Change:
        start = self._seq
        self._seq += 1
        if final:
            self._inflight.append((self._seq, key, entry))
            self._latest[key] = entry
        return Change(rec.encode(record), start, self._seq, since)


def _head(state: ObjectState, digest: str) -> rec.Head:
    meta = rec.user_metadata(dict(state.metadata))
    return rec.Head(state.size, state.content_type, meta, digest)
