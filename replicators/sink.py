"""Applies one stream from this region's vault to its target.

``sync_once()`` lists the segments after the target's last applied one and,
for each in log order: fetches it, verifies it completely (authentication,
Merkle root, its name against its header), checks continuity with the last
applied segment (next seq, start where the previous ended), and applies it.
Nothing is applied from a segment that fails any check: the sink raises
``IntegrityError`` and the stream halts until an operator acts.

The epoch is a fencing token here too (``replicators.lineage``): a segment of
an older epoch that a newer epoch supersedes is *quarantined* — never
applied, counted (``dragent_segments_total{result="quarantined"}``), logged
and listed in ``/status``. Every ``LATE_CHECK_EVERY`` seconds the sink also
lists the older epochs it has seen end, from their boundary on, to find
stale segments published after it moved past them.

While it applies a segment the sink already fetches and opens the next ones
(at most ``PREFETCH`` segments ahead, so at most ``PREFETCH + 1`` segments
are held in memory, blob and records): the fetch and the decryption of the
next segment overlap the apply of this one. Nothing is applied out of order.

A sink that has applied nothing yet starts with the log's first segment. A
first segment other than seq 1 is normal (retention deleted the older ones),
except while a pipelining shipper's first PUTs are still landing: seq 2 can be
listed before seq 1. So a first segment after seq 1 written less than
``HOLE_PATIENCE`` seconds ago is not applied until its predecessor appears or
it is older than that (applying it first would skip seq 1 for good: for an
objects stream, lose the part 0 of an upload whose next parts it holds).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from replicators import lineage, logs
from replicators.errors import IntegrityError
from replicators.keys import KeyProvider, OpenedSegment, unseal
from replicators.lineage import check_continuity
from replicators.metrics import StreamMetrics
from replicators.progress import StreamProgress
from replicators.segment import SegmentHeader
from replicators.stream import Applied, Target
from replicators.vault import SegmentRef, Vault

LATE_CHECK_EVERY = 10.0
PREFETCH = 2
"""Segments fetched and opened ahead of the one being applied."""
HOLE_PATIENCE = 60.0
"""How long a sink waits for a segment missing before a later one of the same epoch."""


@dataclass(frozen=True)
class SinkSettings:
    stream: str
    origin: str
    max_segment_bytes: int | None = None
    """A segment object larger than this is refused unread (the stream's
    ``segment_max_bytes`` with room for framing; None: no cap)."""


class Sink:
    def __init__(
        self,
        settings: SinkSettings,
        vault: Vault,
        keys: KeyProvider,
        target: Target,
        progress: StreamProgress,
        metrics: StreamMetrics,
    ) -> None:
        self.settings = settings
        self.vault = vault
        self.keys = keys
        self.target = target
        self.progress = progress
        self.metrics = metrics
        self.last: Applied | None = None
        self.first_seqs: dict[int, int] = {}  # epoch -> first seq seen (lineage)
        self._late_checked = 0.0
        self._hole_since: float | None = None
        self._first_wait: str | None = None
        self.log = logs.get("sink", stream=settings.stream)

    async def recover(self) -> None:
        self.last = await self.target.state()
        if self.last is not None:
            self.first_seqs.setdefault(self.last.ref.epoch, self.last.ref.seq)
            now = time.time()
            for stage in ("durable", "applied", "verified"):
                self.progress.advance(stage, self.last.end, self.last.source_time, now)

    async def sync_once(self, stop: asyncio.Event) -> int:
        """Apply every new segment in order, quarantining stale ones; returns how many
        were applied."""
        applied = 0
        after = self.last.ref if self.last else None
        refs = [ref async for ref in self.vault.segments(self.settings.stream, after=after)]
        for epoch, seq in lineage.first_seqs(refs).items():
            self.first_seqs[epoch] = min(seq, self.first_seqs.get(epoch, seq))
        bounds = lineage.boundaries(self.first_seqs)
        wanted = [ref for ref in refs if not lineage.is_stale(ref, bounds)]
        place = {ref.key: i for i, ref in enumerate(wanted)}
        ahead: dict[str, asyncio.Task[OpenedSegment]] = {}
        try:
            for ref in refs:
                if stop.is_set():
                    break
                if lineage.is_stale(ref, bounds):
                    self._quarantine(ref, bounds[ref.epoch])
                    continue
                if self._waits_for_hole(ref):
                    break
                at = place[ref.key]
                for later in wanted[at : at + PREFETCH + 1]:
                    if later.key not in ahead:
                        ahead[later.key] = asyncio.ensure_future(self._open(later))
                opened = await ahead.pop(ref.key)
                if self._waits_for_first(ref, opened):
                    break
                await self._apply(ref, opened)
                applied += 1
        finally:
            for task in ahead.values():
                task.cancel()
            if ahead:
                await asyncio.gather(*ahead.values(), return_exceptions=True)
        if time.monotonic() - self._late_checked >= LATE_CHECK_EVERY:
            self._late_checked = time.monotonic()
            await self._find_late(bounds)
        return applied

    def _waits_for_first(self, ref: SegmentRef, opened: OpenedSegment) -> bool:
        """The first segment this sink would apply is after seq 1 and was written less than
        ``HOLE_PATIENCE`` seconds ago: seq 1.. may still be landing (see the module
        docstring). Wait for them."""
        if self.last is not None or ref.seq <= 1:
            return False
        young = time.time() - opened.header.created_at < HOLE_PATIENCE
        if young and self._first_wait != ref.key:
            self._first_wait = ref.key
            self.log.info("waiting for the segments before the first one listed", next=ref.key)
        return young

    def _waits_for_hole(self, ref: SegmentRef) -> bool:
        """A segment of the applied epoch that skips a seq: the one before it may still be
        in flight (a pipelining shipper's PUTs land out of order; one that failed is
        deleted and re-sent). Wait for it, up to ``HOLE_PATIENCE`` seconds; then it is
        lost and the continuity check halts the stream, naming the hole."""
        last = self.last.ref if self.last else None
        if last is None or ref.epoch != last.epoch or ref.seq == last.seq + 1:
            self._hole_since = None
            return False
        now = time.monotonic()
        if self._hole_since is None:
            self._hole_since = now
            self.log.warning("waiting for a segment missing before this one", next=ref.key)
        return now - self._hole_since < HOLE_PATIENCE

    async def _find_late(self, bounds: dict[int, int]) -> None:
        """Stale segments of older epochs published after this sink moved past them."""
        for epoch, from_seq in bounds.items():
            async for ref in self.vault.epoch_segments(self.settings.stream, epoch, from_seq):
                self._quarantine(ref, from_seq)

    def _quarantine(self, ref: SegmentRef, from_seq: int) -> None:
        if ref.key in self.progress.quarantined:
            return
        why = (
            f"stale: epoch {ref.epoch} was superseded from seq {from_seq} on by a newer "
            "epoch (written by a holder that had lost the lease)"
        )
        self.progress.quarantined[ref.key] = why
        self.metrics.quarantined()
        self.log.error("segment quarantined", segment=ref.key, reason=why)

    async def _open(self, ref: SegmentRef) -> OpenedSegment:
        """Fetch and verify one segment (its name against its header, its continuity is
        checked when it is applied)."""
        blob = await self.vault.get_segment(ref, self.settings.max_segment_bytes)
        try:
            opened = await unseal(
                blob,
                self.keys,
                expect_stream=ref.stream,
                expect_epoch=ref.epoch,
                expect_seq=ref.seq,
            )
            _positions(opened.header, ref)
        except IntegrityError:
            self.metrics.rejected()
            raise
        return opened

    async def _apply(self, ref: SegmentRef, opened: OpenedSegment) -> None:
        self.first_seqs.setdefault(ref.epoch, ref.seq)
        try:
            check_continuity(self.last, ref, opened.header)
        except IntegrityError:
            self.metrics.rejected()
            raise
        header = opened.header
        now = time.time()
        self.progress.advance("durable", int(header.end), header.last_source_time, now)
        await self.target.apply(ref, header, opened.records)
        self.last = Applied(ref=ref, end=int(header.end), source_time=header.last_source_time)
        now = time.time()
        self.progress.advance("applied", self.last.end, header.last_source_time, now)
        self.progress.advance("verified", self.last.end, header.last_source_time, now)
        self.metrics.applied(len(opened.records), now - header.first_source_time)


def _positions(header: SegmentHeader, ref: SegmentRef) -> tuple[int, int]:
    """The segment's start and end positions: decimal integers, start <= end. Anything
    else is an integrity error (the header was authenticated: its writer is broken)."""
    digits = all(p.isascii() and p.isdigit() for p in (header.start, header.end))
    start, end = (int(header.start), int(header.end)) if digits else (1, 0)
    if not start <= end:
        raise IntegrityError(
            f"positions {header.start!r}..{header.end!r} are not a range of integers",
            where=f"segment {ref.key}",
        )
    return start, end
