"""Find where a position lies in a PostgreSQL stream's log without reading the log.

A restore starts from a base backup and needs the stream's WAL only from that
backup's start on; the garbage collector needs the same point to know what it may
delete. Both find it here, by a binary search over the log's segment names: the
positions segments hold grow with their order in the log (the WAL's LSNs grow
across segments, across timelines and across gap records; segments a newer epoch
superseded are left out by ``lineage.stale``), so about log2(n) segments are
fetched, each one authenticated and opened like any other (``unseal``): the
segments are their own index, nothing else has to be kept consistent with them
under crashes and deletions. Listing the names stays linear in the log's length,
one request per 1,000 names, which retention bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

from replicators import lineage
from replicators.keys import KeyProvider, unseal
from replicators.postgres import lsn as L
from replicators.vault import SegmentRef, Vault


@dataclass(frozen=True)
class Found:
    """``refs[index:]`` are the segments from the one holding the position on."""

    refs: list[SegmentRef]
    index: int
    probes: int

    @property
    def suffix(self) -> list[SegmentRef]:
        return self.refs[self.index :]


async def log_refs(vault: Vault, stream: str) -> list[SegmentRef]:
    """The stream's segments that belong to its log, in order (stale ones left out)."""
    refs = [r async for r in vault.segments(stream)]
    stale = set(lineage.stale(refs))
    return [r for r in refs if r not in stale]


async def first_needed(
    vault: Vault, keys: KeyProvider, stream: str, lsn: int, refs: list[SegmentRef] | None = None
) -> Found:
    """The first segment of the log whose WAL ends after the start of the WAL file that
    holds ``lsn`` (a restore from a backup starting at ``lsn`` needs it and everything
    after it; nothing before it). ``index == len(refs)`` when every segment ends before.
    Raises ``IntegrityError`` for a probed segment that fails verification."""
    if refs is None:
        refs = await log_refs(vault, stream)
    floor = L.segment_start(lsn)
    lo, hi, probes = 0, len(refs), 0
    while lo < hi:  # invariant: refs[:lo] end at or before floor, refs[hi:] end after it
        mid = (lo + hi) // 2
        ref = refs[mid]
        blob = await vault.get_segment(ref)
        opened = await unseal(
            blob, keys, expect_stream=ref.stream, expect_epoch=ref.epoch, expect_seq=ref.seq
        )
        probes += 1
        if int(opened.header.end) <= floor:
            lo = mid + 1
        else:
            hi = mid
    return Found(refs, lo, probes)
