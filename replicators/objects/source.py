"""The active side: captures a bucket's changes into records.

Capture is driven by one ``ChangeQueue``, fed by filer events (``FilerTail``)
and by a resumable listing scan (``Scanner``). Each queued key is captured by
reading its *current* state: absent → a delete record (if the destination
holds it), unchanged since last shipped → nothing, small → one inline put,
large → its parts, read by ranged ``If-Match`` GETs ``PARTS_AHEAD`` at a time
(never more of the object in memory), possibly across several batches; its
content hash comes from those parts when they are the whole object, else from
a streamed pass run while the first parts are read. An object that changes
during its transfer is abandoned and queued again.

Reads overlap: up to ``FETCH_AHEAD`` queued keys are being read (one GET
each) while earlier ones are captured, in queue order, and the scan reads its
next listing page while the capture works through the current one.

Memory: at most ``FETCH_AHEAD`` × ``inline_max`` of bodies read ahead, plus
``PARTS_AHEAD`` × ``part_size`` of one large object's parts, plus the batch
being built (``segment_max_bytes``) and two listing pages.

Positions are capture sequence numbers: record ``n`` covers ``[n, n+1)``.
``ack`` commits what became durable to the ``ShippedIndex``; a restarted
source starts with a full scan, which re-captures whatever was not durable.

``head()`` proves an idle bucket's RPO: whenever nothing is queued, read
ahead or in transfer, it records (next position, a time before which every
change was seen): the start of the last complete scan, or later, while the
filer subscription has run since before that scan, the time up to which its
events were read (``FilerSubscription.drained_at``). A failing or hung listing or
subscription adds nothing, and a restart forgets it all until a new scan ends.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import xxhash

from replicators import logs
from replicators.bucket import Bucket, ObjectState
from replicators.errors import AlreadyExists, NotFound
from replicators.objects import records as rec
from replicators.objects.index import LOGGED, Entry, ShippedIndex
from replicators.objects.options import ObjectsOptions
from replicators.objects.queue import ChangeQueue
from replicators.objects.scan import Scanner
from replicators.objects.sqs import SqsPoller
from replicators.objects.tail import FilerSubscription
from replicators.objects.webhook import S3Webhook
from replicators.stream import Change

log = logs.get("objects")
KIND = "objects"
IDLE_WAIT = 0.05
FETCH_AHEAD = 16
"""Queued keys read ahead of their capture at once (one GET each, in flight or done)."""
BACKLOG_AGE = 4
"""While a backlog waits (more queued keys than are read ahead), a batch is cut by size,
or at this many times ``max_age``: small segments would not make the backlog's changes
durable sooner, and each costs its own PUT, fetch and apply boundary."""
PARTS_AHEAD = 4
"""Ranged reads of a large object's parts in flight or done ahead of their turn; an
object of at most this many parts is read whole this way and hashed from its parts."""


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
class Ahead:
    """A queued key whose read (``Fetched``) is in flight or done, ahead of its capture."""

    key: str
    since: float
    read: asyncio.Task[Fetched]


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
    parts: dict[int, asyncio.Task[bytes]] = field(default_factory=dict)
    """Ranged reads of the next parts (at most ``PARTS_AHEAD``), by index."""

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
        self.tail: FilerSubscription | S3Webhook | SqsPoller | None = None
        bucket_name, prefix = options.source.bucket, options.source.prefix
        if options.events == "filer" and options.filer:
            # one child for every source of the bucket in this process (a member's partitions)
            self.tail = FilerSubscription(options.filer, bucket_name, prefix)
        elif options.events == "webhook":
            self.tail = S3Webhook(options.webhook, bucket_name, prefix)
        elif options.events == "sqs" and options.sqs:
            self.tail = SqsPoller(options.sqs, bucket_name, prefix)
        self._seq = 0
        self._inflight: list[tuple[int, str, Entry | None]] = []
        self._latest: dict[str, Entry | None] = {}
        self._transfer: Transfer | None = None
        self._ahead: deque[Ahead] = deque()
        self._confirmed: list[Entry] = []
        self._learned: list[Entry] = []
        """Rows whose etag was unknown (learned from the log: a take of a partition, a
        crash before an ack) found to hold the source's current content: written with
        the etag at the next ack or idle wait."""
        self._head: tuple[int, float] | None = None
        self._full = False
        """The last ``_next_change`` found a record that does not fit in the batch."""
        self._doubt: list[Entry] = []
        """Puts of the batch being built, marked in the index before it is returned."""
        self._index_lock = asyncio.Lock()
        """Index commits one at a time (an ack may run while a batch is taken)."""

    # -- Source interface ---------------------------------------------------

    async def resume(self, position: int) -> None:
        self._seq = position
        self._inflight.clear()
        self._latest.clear()
        self._doubt.clear()
        await self._drop_reads()
        self._confirmed.clear()
        self._learned.clear()
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
        times += [a.since for a in self._ahead]
        return min(times) if times else None

    def pending_counts(self) -> dict[str, int]:
        """Changes seen but not yet handed to the shipper: ``objects`` (queued, read ahead, in
        transfer) and ``bytes`` (known ones: read-ahead bodies and the rest of a transfer)."""
        objects = len(self.queue) + len(self._ahead)
        size = sum(len(body) for a in self._ahead if (body := _body(a.read)) is not None)
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
            if len(self.queue) < FETCH_AHEAD and self.scanner.page_ready():
                await self.scanner.step()  # the listing's next page, read meanwhile
            # the first record of a batch always fits, even one larger than max_bytes
            room = max_bytes - size if batch else sys.maxsize
            self._full = False
            change = await self._next_change(room)
            if change is None and self._full and batch:
                break  # the next record does not fit: the batch is as full as it gets
            if change is None and self.pending_since() is None:
                self._prove_head()
            if change is not None:
                if not batch:
                    first = time.time()
                batch.append(change)
                size += len(change.payload)
            if batch and time.time() >= first + max_age * (BACKLOG_AGE if self._behind() else 1):
                break
            if change is not None:
                continue
            if not await self.scanner.step():
                await self._idle(stop)
        await self._mark_in_doubt()
        return batch

    async def ack(self, position: int) -> None:
        done = [(key, entry) for end, key, entry in self._inflight if end <= position]
        if done or self._confirmed or self._learned:
            confirmed, self._confirmed = self._confirmed, []
            # a key with a newer record in flight keeps the row marked for that one
            newest = [(k, e) for k, e in done if self._latest.get(k, 0) == e]
            learned, self._learned = [(e.key, e) for e in self._learned], []
            async with self._index_lock:
                await asyncio.to_thread(self.index.commit, learned + newest, confirmed)
            self._inflight = [x for x in self._inflight if x[0] > position]
            for key, entry in done:
                if self._latest.get(key, 0) == entry:
                    del self._latest[key]
        if isinstance(self.tail, SqsPoller):
            self.tail.ack(position)  # its messages whose changes are now durable are deleted

    async def _mark_in_doubt(self) -> None:
        """Before a batch goes to the shipper, the keys it puts enter the index with their
        etag unknown ("in doubt"): if the segment becomes durable and the agent dies before
        the ack, the index still knows the destination may hold them, so the scan reads
        them again and ships a delete for one gone since. Their ack writes the real row."""
        doubt, self._doubt = self._doubt, []
        if doubt:
            rows = [(e.key, replace(e, etag="", checked_ns=0)) for e in doubt]
            async with self._index_lock:
                await asyncio.to_thread(self.index.commit, rows)

    async def adopt(self, records: Sequence[bytes]) -> None:
        """Records of a segment the shipper found durable but never acknowledged (a crash
        between its PUT and its ack), in log order, before ``resume``. The index learns
        what the destination now holds, its etag unknown: the scan reads those keys again
        (a needless re-ship at worst) and ships a delete for one gone since, instead of
        taking it for never shipped and leaving it in the mirror for good."""
        changes: list[tuple[str, Entry | None]] = []
        for raw in records:
            r = rec.decode(raw)
            if isinstance(r, rec.Delete):
                changes.append((r.key, None))
            elif isinstance(r, rec.Put) or r.last:
                h = r.head
                meta = rec.meta_fingerprint(h.content_type, h.metadata)
                entry = Entry(r.key, LOGGED, h.size, r.version.time_ns, h.content_hash, meta)
                changes.append((r.key, entry))
        if changes:
            async with self._index_lock:
                await asyncio.to_thread(self.index.commit, changes)

    async def aclose(self) -> None:
        self.scanner.close()  # the shared listing no longer waits for this one
        await self._drop_reads()
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

    def _behind(self) -> bool:
        """More changes wait than are being read ahead (a scan's backlog, a burst)."""
        return len(self.queue) >= FETCH_AHEAD

    def _capturing(self, key: str) -> bool:
        """``key`` is queued, read ahead or in transfer: a record of it may still come."""
        t = self._transfer
        return (
            key in self.queue
            or (t is not None and t.state.key == key)
            or any(a.key == key for a in self._ahead)
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
        if self._confirmed or self._learned:
            confirmed, self._confirmed = self._confirmed, []
            learned, self._learned = [(e.key, e) for e in self._learned], []
            async with self._index_lock:
                await asyncio.to_thread(self.index.commit, learned, confirmed)
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
                self._full = True
                return None
            return await self._next_part(self._transfer)
        self._read_ahead()
        while self._ahead:
            got = await self._ahead[0].read  # in queue order (a failed read fails the step)
            if got.body is not None and len(got.body) + 4096 > room:
                self._full = True
                return None  # first in the next batch
            self._ahead.popleft()
            self._read_ahead()
            change = await self._capture(got, room)
            if change is not None or self._transfer is not None:
                return change
        return None

    def _shipped(self, key: str) -> Entry | None:
        return self._latest[key] if key in self._latest else self.index.get(key)

    def _read_ahead(self) -> None:
        """Keep up to ``FETCH_AHEAD`` queued keys being read (one GET each), in queue order:
        at most that many inline bodies (each ≤ ``inline_max``) wait in memory."""
        while len(self._ahead) < FETCH_AHEAD and (item := self.queue.pop()) is not None:
            key, since = item
            self._ahead.append(Ahead(key, since, _task(self._fetch(key, since))))

    async def _fetch(self, key: str, since: float) -> Fetched:
        shipped = self._shipped(key)
        read_ns = time.time_ns()
        try:
            state, body = await self.bucket.fetch(
                key, int(self.options.inline_max), shipped.etag if shipped else ""
            )
        except NotFound:
            return Fetched(key, since, None, None, read_ns)
        return Fetched(key, since, state, body, read_ns)

    async def _drop_reads(self) -> None:
        """Forget every read ahead and the transfer (a resume or close)."""
        tasks = [a.read for a in self._ahead]
        if (t := self._transfer) is not None:  # never acknowledged: captured again
            tasks += t.parts.values()
            self.queue.release(t.state.key)
            self.queue.add(t.state.key, t.since)
        self._ahead.clear()
        self._transfer = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _capture(self, got: Fetched, room: int) -> Change | None:
        key, since, state, body = got.key, got.since, got.state, got.body
        shipped = self._shipped(key)
        if state is None:
            if shipped is None:
                return None
            version = rec.Version(max(time.time_ns(), shipped.time_ns + 1), self._seq)
            return self._emit(rec.Delete(key, version), key, None, since)
        meta = rec.meta_fingerprint(state.content_type, dict(state.metadata))
        if shipped and self._same_content(shipped, got, meta):
            return None  # shipped by another owner, or before a crash: known now
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

    def _same_content(self, shipped: Entry, got: Fetched, meta: str) -> bool:
        """A row learned from the log (``index.LOGGED``: ``handover``, ``adopt``) and an
        inline object in the very state it records: same size, LastModified, metadata and
        content hash. The row learns the etag (``_learned``); nothing is shipped."""
        state, body = got.state, got.body
        if shipped.etag != LOGGED or state is None or body is None:
            return False
        same = (shipped.size, shipped.time_ns, shipped.meta) == (
            state.size,
            state.time_ns,
            meta,
        ) and rec.content_hash(body) == shipped.content_hash
        if same:
            self._learned.append(replace(shipped, etag=state.etag, checked_ns=got.read_ns))
        return same

    async def _start_transfer(
        self, state: ObjectState, since: float, read_ns: int, room: int
    ) -> Change | None:
        """Start shipping a large object: its first ``PARTS_AHEAD`` parts are read at once;
        the content hash comes from them when they are the whole object, else from a
        streamed pass over it (run while they are read)."""
        count = rec.part_count(state.size, int(self.options.part_size))
        version = rec.Version(state.time_ns, self._seq)
        t = Transfer(state, _head(state, ""), version, count, since, read_ns)
        self.queue.hold(state.key)
        self._read_parts(t)
        try:
            if count <= PARTS_AHEAD:
                digest = xxhash.xxh3_128()
                for i in range(count):
                    digest.update(await t.parts[i])
                content_hash = digest.hexdigest()
            else:
                content_hash = await self.bucket.content_hash(state.key, state.etag)
        except (AlreadyExists, NotFound):
            await self._abandon(t)
            return None
        except BaseException:
            await self._abandon(t, again=False)
            raise
        t.head = _head(state, content_hash)
        self._transfer = t
        if self.options.part_size + 4096 > room:
            self._full = True
            return None
        return await self._next_part(t)

    def _read_parts(self, t: Transfer) -> None:
        """Keep the ranged reads of parts ``index`` .. ``index + PARTS_AHEAD - 1`` going."""
        part_size = int(self.options.part_size)
        key, etag = t.state.key, t.state.etag
        for i in range(t.index, min(t.count, t.index + PARTS_AHEAD)):
            if i not in t.parts:
                offset = i * part_size
                end = min(offset + part_size, t.state.size)
                t.parts[i] = _task(self.bucket.read(key, etag, offset, end))

    async def _abandon(self, t: Transfer, again: bool = True) -> None:
        """Drop a transfer; ``again``: the object changed under it, capture it anew."""
        if self._transfer is t:
            self._transfer = None
        tasks = list(t.parts.values())
        t.parts.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.queue.release(t.state.key)
        if again:
            log.info("object changed during its transfer; capturing it again", key=t.state.key)
            self.queue.add(t.state.key, t.since)

    async def _next_part(self, t: Transfer) -> Change | None:
        part_size = int(self.options.part_size)
        offset = t.index * part_size
        key = t.state.key
        self._read_parts(t)
        try:
            body = await t.parts.pop(t.index)
        except (AlreadyExists, NotFound):
            await self._abandon(t)
            return None
        record = rec.Part(key, t.version, t.head, t.index, t.count, offset, body)
        t.index += 1
        self._read_parts(t)
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
            if entry is not None:
                self._doubt.append(entry)
        return Change(rec.encode(record), start, self._seq, since)


def _head(state: ObjectState, digest: str) -> rec.Head:
    meta = rec.user_metadata(dict(state.metadata))
    return rec.Head(state.size, state.content_type, meta, digest)


def _task(coro: Any) -> asyncio.Task[Any]:
    """A read ahead; its failure is raised where it is awaited (or dropped with it)."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


def _body(task: asyncio.Task[Fetched]) -> bytes | None:
    if not task.done() or task.cancelled() or task.exception() is not None:
        return None
    return task.result().body
