"""Which segments belong to a stream's log: the epoch as a fencing token, at the reader.

A log lists in (epoch, seq) order. When a newer epoch begins at seq ``f``, its
writer continued from seq ``f - 1`` (it adopted everything of the older epoch
before ``f`` and nothing after). A segment of an older epoch at seq ``f`` or
later was therefore written by a holder that had lost the lease, or diverged
from the new one: it is *stale*. Readers never apply a stale segment; they
quarantine and report it (``replicators.sink``, ``dragent vault verify``).

A stale segment published late sorts before a reader that has moved on to
the newer epoch, so a listing that starts after the reader's position never
shows it: ``boundaries`` says where to look (the older epoch, from ``f`` on).

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from replicators.errors import IntegrityError
from replicators.segment import SegmentHeader
from replicators.stream import Applied
from replicators.vault import SegmentRef


def first_seqs(refs: Iterable[SegmentRef]) -> dict[int, int]:
    """The first seq of each epoch among ``refs``."""
    first: dict[int, int] = {}
    for ref in refs:
        first[ref.epoch] = min(ref.seq, first.get(ref.epoch, ref.seq))
    return first


def boundaries(first: dict[int, int]) -> dict[int, int]:
    """For each epoch, the seq from which its segments are stale (the smallest first seq
    of any newer epoch); epochs with no newer one are absent."""
    out: dict[int, int] = {}
    for epoch in first:
        newer = [seq for e, seq in first.items() if e > epoch]
        if newer:
            out[epoch] = min(newer)
    return out


def is_stale(ref: SegmentRef, bounds: dict[int, int]) -> bool:
    return ref.epoch in bounds and ref.seq >= bounds[ref.epoch]


def stale(refs: Iterable[SegmentRef], known: dict[int, int] | None = None) -> list[SegmentRef]:
    """The members of ``refs`` (one stream) that a newer epoch supersedes, given the first
    seqs of epochs seen before (``known``) and those among ``refs``."""
    refs = list(refs)
    first = dict(known or {})
    for epoch, seq in first_seqs(refs).items():
        first[epoch] = min(seq, first.get(epoch, seq))
    bounds = boundaries(first)
    return [r for r in refs if is_stale(r, bounds)]


def check_continuity(last: Applied | None, ref: SegmentRef, header: SegmentHeader) -> None:
    """Raise ``IntegrityError`` unless ``ref`` follows ``last`` with no gap or overlap."""
    where = f"segment {ref.key}"
    if last is None:
        return
    if ref.epoch < last.ref.epoch:
        raise IntegrityError(
            f"epoch {ref.epoch} is older than applied {last.ref.epoch}", where=where
        )
    if ref.epoch > last.ref.epoch and ref.seq <= last.ref.seq:
        raise IntegrityError(
            f"epoch {ref.epoch} begins at seq {ref.seq}, but seq {ref.seq}..{last.ref.seq} "
            f"of epoch {last.ref.epoch} were applied: they came from a holder that had lost "
            "the lease and the target diverged",
            where=where,
            hint="re-seed the target from the new primary",
        )
    if ref.seq != last.ref.seq + 1:
        raise IntegrityError(f"gap: expected seq {last.ref.seq + 1}, found {ref.seq}", where=where)
    if int(header.start) != last.end:
        raise IntegrityError(
            f"gap: segment starts at {header.start}, previous ended at {last.end}", where=where
        )
