"""Applies one stream from this region's vault to its target.

``sync_once()`` lists the segments after the target's last applied one and,
for each in log order: fetches it, verifies it completely (authentication,
Merkle root, its name against its header), checks continuity with the last
applied segment (next seq, start where the previous ended), and applies it.
Nothing is applied from a segment that fails any check: the sink raises
``IntegrityError`` and the stream halts until an operator acts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from replicators.errors import IntegrityError
from replicators.keys import KeyProvider, unseal
from replicators.metrics import StreamMetrics
from replicators.progress import StreamProgress
from replicators.segment import SegmentHeader
from replicators.stream import Applied, Target
from replicators.vault import SegmentRef, Vault


@dataclass(frozen=True)
class SinkSettings:
    stream: str
    origin: str


def check_continuity(last: Applied | None, ref: SegmentRef, header: SegmentHeader) -> None:
    """Raise ``IntegrityError`` unless ``ref`` follows ``last`` with no gap or overlap."""
    where = f"segment {ref.key}"
    if last is None:
        return
    if ref.epoch < last.ref.epoch:
        raise IntegrityError(
            f"epoch {ref.epoch} is older than applied {last.ref.epoch}", where=where
        )
    if ref.seq != last.ref.seq + 1:
        raise IntegrityError(f"gap: expected seq {last.ref.seq + 1}, found {ref.seq}", where=where)
    if int(header.start) != last.end:
        raise IntegrityError(
            f"gap: segment starts at {header.start}, previous ended at {last.end}", where=where
        )


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

    async def recover(self) -> None:
        self.last = await self.target.state()
        if self.last is not None:
            now = time.time()
            for stage in ("durable", "applied", "verified"):
                self.progress.advance(stage, self.last.end, self.last.source_time, now)

    async def sync_once(self, stop: asyncio.Event) -> int:
        """Apply every new segment in order; returns how many were applied."""
        applied = 0
        after = self.last.ref if self.last else None
        async for ref in self.vault.segments(self.settings.stream, after=after):
            if stop.is_set():
                break
            await self._apply(ref)
            applied += 1
        return applied

    async def _apply(self, ref: SegmentRef) -> None:
        blob = await self.vault.get_segment(ref)
        try:
            opened = await unseal(
                blob,
                self.keys,
                expect_stream=ref.stream,
                expect_epoch=ref.epoch,
                expect_seq=ref.seq,
            )
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
