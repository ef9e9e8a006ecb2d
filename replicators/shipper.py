"""Ships one stream from its source to one destination region's vault.

``sync_once()`` is the whole job, idempotent and safe to repeat: take one
batch from the source, seal it into the next segment, publish it in the
destination vault, record the new position, and only then acknowledge it to
the source. A crash at any point loses nothing: on ``recover()`` the shipper
reads its checkpoint, adopts any segment published after it (so none is sent
twice) and resumes the source from the end of the last durable segment.

The RPO it feeds (``StreamProgress``) rests on proofs: a step that returned a
batch and made it durable proves what the source no longer holds
(``step_done``); a source may also offer ``head()``, its head read
independently of capture (``replicators.progress.Head``). Recovering proves
nothing: it only says where the stream resumes.

With ``in_flight`` > 1 (zero-loss mode) the shipper pipelines: it takes the next batch
while earlier segments' PUTs are still in flight (at most ``in_flight`` of them), and
acknowledges them strictly in log order as they complete, so a commit waits about one
PUT, not the one in flight plus its own. A PUT that fails after a later one succeeded
leaves a hole in the log: ``recover()`` adopts the log only up to the hole and deletes
the segments after it in its own epoch (never acknowledged, and never applied: a sink
does not pass a hole), so the source re-sends their changes after the hole's. The
log's first segment, and an epoch's first, is always landed before the next is sent (a
sink that has applied nothing starts at the first segment it lists, and a sink waits
for a missing segment only within the epoch it applies).

A segment adopted on recovery was durable but never acknowledged (a crash between its
PUT and its ack); a source with an ``adopt(records)`` method is handed its records first
(and the checkpoint's segment's: a crash may come between the checkpoint and the ack),
so that it knows what the destination holds (the objects source: that a key shipped and
later deleted needs a delete, not nothing).

The epoch in every name is a fencing token: a shipper that finds a newer
epoch in the log is stale and halts (``IntegrityError``). A name already
taken when publishing is adopted only if it holds the same range and records
(this shipper's own PUT, retried after a lost reply); otherwise a second
writer of the same stream and epoch exists, and the shipper halts rather
than merge two logs.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from replicators import checkpoint, logs
from replicators.errors import AlreadyExists, IntegrityError, NotFound
from replicators.keys import KeyProvider, unseal
from replicators.metrics import StreamMetrics
from replicators.progress import StreamProgress
from replicators.segment import seal
from replicators.stream import Change, Source
from replicators.vault import SegmentRef, Vault


@dataclass(frozen=True)
class ShipperSettings:
    stream: str
    destination: str
    epoch: int
    segment_max_bytes: int
    segment_max_age: float
    in_flight: int = 1
    """Segments whose PUT may be in flight at once (1: one at a time)."""


class Shipper:
    def __init__(
        self,
        settings: ShipperSettings,
        source: Source,
        vault: Vault,
        keys: KeyProvider,
        state_path: Path,
        progress: StreamProgress,
        metrics: StreamMetrics,
    ) -> None:
        self.settings = settings
        self.source = source
        self.vault = vault
        self.keys = keys
        self.state_path = state_path
        self.progress = progress
        self.metrics = metrics
        self.last: SegmentRef | None = None
        self.end = 0
        self._flying: deque[_Flying] = deque()
        progress.source_pending = source.pending_since
        progress.source_head = getattr(source, "head", None)
        progress.source_floor = getattr(source, "unrestorable_since", None)

    async def recover(self) -> None:
        """Find the last durable segment (checkpoint, then the vault) and resume the source."""
        for flying in self._flying:  # PUTs of a step that failed: recovery decides
            flying.put.cancel()
        self._flying.clear()
        state = checkpoint.load(self.state_path)
        durable_time: float | None = None
        if state is not None:
            self.last = SegmentRef(epoch=state["epoch"], seq=state["seq"], stream=state["stream"])
            self.end = int(state["end"])
            durable_time = _source_time(state)
            # before any vault I/O, which may fail: the RPO counts from here, not from now
            self.progress.count_from(durable_time)
        orphans: list[SegmentRef] = []
        # a hole counts only after a segment still in the vault: retention deletes the
        # log's oldest segments, and those can include the checkpoint's
        present = self.last is not None and await self._present(self.last)
        # a source that keeps its own record of what is durable learns what it missed
        adopt = getattr(self.source, "adopt", None)
        if adopt is not None and present and self.last is not None:
            # the checkpoint's own segment too: a crash may have come between saving the
            # checkpoint and acknowledging the source
            last = self.last
            blob = await self.vault.get_segment(last)
            opened = await unseal(blob, self.keys, expect_stream=last.stream, expect_seq=last.seq)
            await adopt(opened.records)
        async for ref in self.vault.segments(self.settings.stream, after=self.last):
            self._not_stale(ref)
            if orphans or (present and self._after_hole(ref)):
                orphans.append(ref)
                continue
            blob = await self.vault.get_segment(ref)
            opened = await unseal(blob, self.keys, expect_stream=ref.stream, expect_seq=ref.seq)
            if adopt is not None:
                await adopt(opened.records)
            self.last, self.end = ref, int(opened.header.end)
            present = True
            durable_time = opened.header.last_source_time
            self._save(durable_time)
        await self._delete_orphans(orphans)
        note = getattr(self.source, "note_durable_time", None)
        if note is not None:
            note(durable_time)
        await self.source.resume(self.end)
        await self.source.ack(self.end)
        self.progress.resumed(self.end, durable_time, time.time())

    async def sync_once(self, stop: asyncio.Event) -> bool:
        """Ship one batch. Returns False when the source had nothing (stop was set)."""
        s = self.settings
        if s.in_flight > 1:
            return await self._pipelined(stop)
        began = time.time()
        batch = await self.source.next_batch(int(s.segment_max_bytes), s.segment_max_age, stop)
        if not batch:
            return False  # cut short by the stop: no proof of anything
        now = time.time()
        self.progress.capture(batch[-1].end, batch[-1].source_time, now, batch[0].source_time)
        await self._publish(batch)
        self.progress.step_done(began)
        return True

    async def _pipelined(self, stop: asyncio.Event) -> bool:
        """Take the next batch while earlier PUTs fly, acknowledging each PUT in order as
        soon as it lands (even while the source waits for changes). At most ``in_flight``
        PUTs at once. When ``stop`` cuts the batch short, the PUTs in flight are finished."""
        s = self.settings
        # the log's first segment, and this epoch's, lands alone: a sink that has applied
        # nothing starts at the first segment it lists, and one waits for a missing segment
        # only within its epoch; neither must find seq n + 1 while seq n is in flight
        alone = self.last is None or self.last.epoch != s.epoch
        while len(self._flying) >= (1 if alone else s.in_flight):
            await self._land_first()
        began = time.time()
        taking = asyncio.ensure_future(
            self.source.next_batch(int(s.segment_max_bytes), s.segment_max_age, stop)
        )
        try:
            while not taking.done():
                heads = [self._flying[0].put] if self._flying else []
                await asyncio.wait([taking, *heads], return_when=asyncio.FIRST_COMPLETED)
                while self._flying and self._flying[0].put.done():
                    await self._land_first()
        except BaseException:
            taking.cancel()
            raise
        batch = taking.result()
        if not batch:
            while self._flying:
                await self._land_first()
            return False
        now = time.time()
        self.progress.capture(batch[-1].end, batch[-1].source_time, now, batch[0].source_time)
        last = self._flying[-1].ref if self._flying else self.last
        ref = SegmentRef(epoch=s.epoch, seq=last.seq + 1 if last else 1, stream=s.stream)
        flying = _Flying(ref, batch, asyncio.get_running_loop().create_future(), began, 0)
        # sealed (in a thread) and PUT while the next batch is taken
        flying.put = asyncio.ensure_future(self._seal_and_put(flying))
        self._flying.append(flying)
        return True

    async def _seal_and_put(self, flying: _Flying) -> None:
        blob = await self._seal(flying.ref, flying.batch)
        flying.size = len(blob)
        await self._put(flying.ref, blob, flying.batch)

    async def _land_first(self) -> None:
        """Wait for the oldest PUT in flight and make it durable (checkpoint, ack). A failed
        PUT fails the step; the ones after it are cancelled (``recover`` clears any that
        landed)."""
        first = self._flying[0]
        try:
            await first.put
        except BaseException:
            for other in self._flying:
                other.put.cancel()
            self._flying.clear()
            raise
        self._flying.popleft()
        batch = first.batch
        self.last, self.end = first.ref, batch[-1].end
        await asyncio.to_thread(self._save, batch[-1].source_time)
        await self.source.ack(self.end)
        now = time.time()
        after = self._flying[0].batch[0].source_time if self._flying else None
        self.progress.durable(self.end, batch[-1].source_time, now, after)
        self.metrics.sealed([c.payload for c in batch], first.size, now - batch[0].source_time)
        self.progress.step_done(first.began)

    async def _seal(self, ref: SegmentRef, batch: list[Change]) -> bytes:
        data_key = await self.keys.data_key()
        return await asyncio.to_thread(
            seal,
            [c.payload for c in batch],
            stream=ref.stream,
            epoch=ref.epoch,
            seq=ref.seq,
            start=str(batch[0].start),
            end=str(batch[-1].end),
            first_source_time=batch[0].source_time,
            last_source_time=batch[-1].source_time,
            data_key=data_key,
            created_at=time.time(),
        )

    async def _put(self, ref: SegmentRef, blob: bytes, batch: list[Change]) -> None:
        with self.metrics.put_seconds.time():
            try:
                await self.vault.put_segment(ref, blob)
            except AlreadyExists:
                await self._same_as_published(ref, batch)

    def _after_hole(self, ref: SegmentRef) -> bool:
        """A segment of this shipper's epoch that does not follow the last adopted one."""
        last = self.last
        if ref.epoch != self.settings.epoch or last is None or last.epoch != ref.epoch:
            return False
        return ref.seq != last.seq + 1

    async def _present(self, ref: SegmentRef) -> bool:
        try:
            await self.vault.store.stat(ref.key)
        except NotFound:
            return False
        return True

    async def _delete_orphans(self, orphans: list[SegmentRef]) -> None:
        """Segments after a hole in this epoch: PUTs that landed after an earlier one failed.
        Never acknowledged (the source still holds their changes) and never applied (a
        sink stops at a hole): deleted, so that the log continues from the hole."""
        if not orphans:
            return
        log = logs.get("shipper", stream=self.settings.stream)
        log.warning(
            "deleting segments published after a hole in the log (a pipelined PUT failed)",
            first=orphans[0].key, count=len(orphans),
        )  # fmt: skip
        for ref in orphans:
            await self.vault.store.delete(ref.key)

    async def _publish(self, batch: list[Change]) -> None:
        s = self.settings
        seq = self.last.seq + 1 if self.last else 1
        ref = SegmentRef(epoch=s.epoch, seq=seq, stream=s.stream)
        blob = await self._seal(ref, batch)
        await self._put(ref, blob, batch)
        self.last, self.end = ref, batch[-1].end
        await asyncio.to_thread(self._save, batch[-1].source_time)
        await self.source.ack(self.end)
        now = time.time()
        self.progress.durable(self.end, batch[-1].source_time, now, None)
        self.metrics.sealed([c.payload for c in batch], len(blob), now - batch[0].source_time)

    def _not_stale(self, ref: SegmentRef) -> None:
        """A segment of a newer epoch in the log means another region holds the lease: this
        shipper is stale and must write nothing more. Raises ``IntegrityError`` (halts)."""
        if ref.epoch > self.settings.epoch:
            raise IntegrityError(
                f"the vault holds epoch {ref.epoch} and this shipper writes epoch "
                f"{self.settings.epoch}: a newer lease holder ships this stream",
                where=f"segment {ref.key}",
                hint="this region must not ship: check that it is fenced",
            )

    async def _same_as_published(self, ref: SegmentRef, batch: list[Change]) -> None:
        """The name was taken. Ours if it holds the same range and records (a PUT retried
        after its reply was lost): adopt it. Anything else is a second writer of this
        stream and epoch: raise ``IntegrityError`` (halts, never merges two logs)."""
        opened = await unseal(
            await self.vault.get_segment(ref),
            self.keys,
            expect_stream=ref.stream,
            expect_epoch=ref.epoch,
            expect_seq=ref.seq,
        )
        h = opened.header
        ours = (str(batch[0].start), str(batch[-1].end), [c.payload for c in batch])
        if (h.start, h.end, opened.records) != ours:
            raise IntegrityError(
                f"another shipper published this name with range [{h.start}, {h.end}), this "
                f"one holds [{batch[0].start}, {batch[-1].end}): two writers of one stream",
                where=f"segment {ref.key}",
                hint="run one active agent per stream and destination",
            )

    def _save(self, source_time: float) -> None:
        assert self.last is not None
        state = {
            "stream": self.last.stream,
            "epoch": self.last.epoch,
            "seq": self.last.seq,
            "end": self.end,
            "source_time": source_time,
            "destination": self.settings.destination,
        }
        checkpoint.save(self.state_path, state)


def _source_time(state: dict[str, object]) -> float | None:
    """The checkpoint's last durable source time (None in a checkpoint written without it)."""
    value = state.get("source_time")
    return float(value) if isinstance(value, int | float) else None


@dataclass
class _Flying:
    """A segment whose PUT is in flight (pipelined shipping)."""

    ref: SegmentRef
    batch: list[Change]
    put: asyncio.Future[None]
    began: float
    size: int
