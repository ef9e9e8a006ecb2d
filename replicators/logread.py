"""Reading a stream's log from the vault: the walk every restore uses.

``read_log`` yields the stream's segments in log order, each one fully
verified before it is yielded: authenticated and opened by ``unseal`` with
its name bound to its header (stream, epoch, seq: an old segment copied
under a new name is refused), continuous with the one before it (no gap or
overlap in seq or position: ``lineage.check_continuity``), and segments of
a superseded epoch left out (``lineage.stale``, named in ``LogWalk.stale``).

Errors: ``IntegrityError`` for a segment that fails any check (nothing after
it is yielded), the key provider's and the store's errors otherwise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from replicators import lineage
from replicators.keys import KeyProvider, unseal
from replicators.segment import OpenedSegment
from replicators.stream import Applied
from replicators.vault import SegmentRef, Vault


@dataclass
class LogWalk:
    """One walk of a stream's log; ``stale`` holds the superseded segments left out."""

    vault: Vault
    keys: KeyProvider
    stream: str
    stale: list[SegmentRef] = field(default_factory=list)
    bytes: int = 0
    """Bytes of the segments fetched so far."""
    at: SegmentRef | None = None
    """The segment being read (after an ``IntegrityError``: the one that failed)."""

    async def refs(self) -> list[SegmentRef]:
        """The stream's segments that belong to its log, in order (names only)."""
        refs = [r async for r in self.vault.segments(self.stream)]
        self.stale = lineage.stale(refs)
        left_out = set(self.stale)
        return [r for r in refs if r not in left_out]

    async def open(self, ref: SegmentRef) -> OpenedSegment:
        """Fetch and open one segment, its name bound to its header."""
        self.at = ref
        blob = await self.vault.get_segment(ref)
        self.bytes += len(blob)
        return await unseal(
            blob,
            self.keys,
            expect_stream=ref.stream,
            expect_epoch=ref.epoch,
            expect_seq=ref.seq,
        )

    async def read(
        self,
        refs: Sequence[SegmentRef] | None = None,
        done: Callable[[int], None] = lambda n: None,
    ) -> AsyncIterator[tuple[SegmentRef, OpenedSegment]]:
        """Yield every segment of ``refs`` (default: the whole log) opened and checked for
        continuity with the one before; ``done(1)`` after each (a progress bar)."""
        last: Applied | None = None
        for ref in await self.refs() if refs is None else refs:
            opened = await self.open(ref)
            lineage.check_continuity(last, ref, opened.header)
            h = opened.header
            last = Applied(ref=ref, end=int(h.end), source_time=h.last_source_time)
            yield ref, opened
            done(1)
