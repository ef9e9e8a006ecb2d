"""Repairing a postgres stream's log: which segments to re-ship, and their records.

Pure: no I/O. ``agent.vaultrepair`` walks the vault, reads the WAL from the
source and publishes what this module plans and builds.

A damaged run is the segments between two readable ones (``before`` and
``after``) that are unreadable (they fail ``unseal``) or missing (a hole in seq
within an epoch). The positions the run covers are known from the neighbours:
``[before.end, after.start)``. Its segments keep their names (stream, epoch,
seq); the range is cut into one piece per segment, never across a WAL file (a
batch of the WAL source never crosses one), so the pieces' bounds inside the
range may differ from the lost originals: only the range's ends, and the
continuity of seq and position, are checked by readers. A run at the start or
the end of the log has one bound unknown and cannot be repaired.

Source times: the original first and last source times of a lost segment are
unrecoverable (they were in its header). A replacement carries the bounds the
neighbours prove: its WAL was written no earlier than ``before``'s last source
time and no later than ``after``'s first, so ``first_source_time`` is the former
and ``last_source_time`` the latter.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from replicators.postgres import lsn as L
from replicators.segment import OpenedSegment
from replicators.vault import SegmentRef

WAL_PAGE_SIZE = 8192
RECORD_BYTES = 128 * 1024
"""WAL bytes per record of a replacement (the WAL source's records are replication
messages of about this size; any size within one WAL file decodes the same)."""
_PAGE_ADDR = struct.Struct("<Q")  # XLogPageHeaderData.xlp_pageaddr, at offset 8
_PAGE_ADDR_AT = 8


@dataclass(frozen=True)
class Entry:
    """One segment of the walk: readable (``start`` set) or not (``start`` None)."""

    ref: SegmentRef
    start: str | None = None
    end: str | None = None
    first_source_time: float = 0.0
    last_source_time: float = 0.0
    first_timeline: int | None = None
    """The timeline of its first WAL or gap record (None: it holds none)."""
    last_timeline: int | None = None

    @property
    def readable(self) -> bool:
        return self.start is not None


def entry_of(ref: SegmentRef, opened: OpenedSegment | None, *, postgres: bool = True) -> Entry:
    """The ``Entry`` of a segment of the walk (``opened`` None: it could not be opened).
    With ``postgres``, the timelines of its records are read from their heads."""
    if opened is None:
        return Entry(ref)
    h = opened.header
    timelines = []
    if postgres:
        for record in opened.records:
            try:
                timeline, start, _ = L.unpack_record(record)
            except ValueError:
                continue
            if start != L.HISTORY:
                timelines.append(timeline)
    return Entry(
        ref, h.start, h.end, h.first_source_time, h.last_source_time,
        timelines[0] if timelines else None, timelines[-1] if timelines else None,
    )  # fmt: skip


@dataclass(frozen=True)
class Damage:
    """A run of damaged segments between two readable ones, and how to repair it."""

    refs: tuple[SegmentRef, ...]
    """The segments to write again, in log order."""
    missing: tuple[SegmentRef, ...]
    """Those of ``refs`` with no object in the vault (the others are unreadable)."""
    start: str | None
    """The end of the readable segment before (None: the log's start)."""
    end: str | None
    """The start of the readable segment after (None: the log's end)."""
    before: SegmentRef | None = None
    after: SegmentRef | None = None
    timeline: int | None = None
    first_source_time: float = 0.0
    last_source_time: float = 0.0
    problem: str | None = None
    """Why it cannot be repaired from the source (None: it can)."""

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.refs]

    def pieces(self) -> list[tuple[int, int]]:
        """One ``[start, end)`` per segment of the run (``split_range``)."""
        assert self.start is not None and self.end is not None
        return split_range(int(self.start), int(self.end), len(self.refs))


def plan(entries: Sequence[Entry], *, postgres: bool = True) -> list[Damage]:
    """Every damaged run of a log (``entries`` in log order, superseded segments left
    out), each with its range and, for a postgres stream, its timeline; ``problem`` says
    why a run cannot be repaired. Missing segments are found as holes in seq."""
    out: list[Damage] = []
    prev: Entry | None = None  # the last readable entry
    pending: list[Entry] = []  # unreadable since then
    for entry in entries:
        if not entry.readable:
            pending.append(entry)
            continue
        if pending or (prev is not None and entry.ref.seq > prev.ref.seq + 1):
            out.append(_run(entries, prev, pending, entry, postgres))
        prev, pending = entry, []
    if pending:
        out.append(_run(entries, prev, pending, None, postgres))
    return out


def _run(
    seen: Sequence[Entry],
    prev: Entry | None,
    pending: list[Entry],
    after: Entry | None,
    postgres: bool,
) -> Damage:
    """The damaged run between ``prev`` and ``after`` (either may be None: the log's
    start or end), holding the unreadable ``pending`` and the holes around them."""
    known = [e.ref for e in (prev, *pending, after) if e is not None]
    lo = prev.ref.seq + 1 if prev is not None else pending[0].ref.seq
    hi = after.ref.seq - 1 if after is not None else pending[-1].ref.seq
    by_seq = {e.ref.seq: e.ref for e in pending}
    refs: list[SegmentRef] = []
    missing: list[SegmentRef] = []
    problem: str | None = None
    for seq in range(lo, hi + 1):
        if seq in by_seq:
            refs.append(by_seq[seq])
            continue
        below = [r.epoch for r in known if r.seq < seq]
        above = [r.epoch for r in known if r.seq > seq]
        if below and above and below[-1] == above[0]:
            epoch = below[-1]
        else:
            epoch = below[-1] if below else above[0]
            why = f"seq {seq} is missing across an epoch change: its epoch is unknown"
            problem = problem or why
        ref = SegmentRef(epoch, seq, known[0].stream)
        refs.append(ref)
        missing.append(ref)
    start = prev.end if prev is not None else None
    end = after.start if after is not None else None
    if prev is None:
        problem = problem or "it begins the log: where it starts is unknown"
    if after is None:
        problem = problem or "it ends the log: where it ends is unknown"
    timeline = None
    if postgres and start is not None and end is not None:
        timeline, why = _timeline(seen, prev, after)
        problem = problem or why
        if problem is None and int(end) < int(start):
            problem = f"its neighbours overlap (previous ends at {start}, next starts at {end})"
    return Damage(
        refs=tuple(refs), missing=tuple(missing), start=start, end=end,
        before=prev.ref if prev else None, after=after.ref if after else None,
        timeline=timeline,
        first_source_time=prev.last_source_time if prev else 0.0,
        last_source_time=after.first_source_time if after else 0.0,
        problem=problem,
    )  # fmt: skip


def _timeline(
    seen: Sequence[Entry], prev: Entry | None, after: Entry | None
) -> tuple[int | None, str | None]:
    """The timeline of the WAL between ``prev`` and ``after``: the last one of the readable
    segments before and the first one after, which must agree (a timeline switch inside
    the range would need its history file, which only the lost segment held)."""
    readable = [e for e in seen if e.readable]
    cut = readable.index(after) if after is not None else len(readable)
    before = next((e.last_timeline for e in reversed(readable[:cut]) if e.last_timeline), None)
    later = next((e.first_timeline for e in readable[cut:] if e.first_timeline), None)
    if before is not None and later is not None and before != later:
        return None, f"the timeline changes inside it ({before} before, {later} after)"
    timeline = before or later
    if timeline is None:
        return None, "no readable segment holds WAL: its timeline is unknown"
    return timeline, None


def split_range(start: int, end: int, count: int) -> list[tuple[int, int]]:
    """Cut ``[start, end)`` into ``count`` contiguous pieces, none crossing a WAL file:
    first at the WAL file boundaries, then the largest piece in halves; pieces of
    nothing (``start == end``, a segment with no record) when there is not enough.
    Raises ``ValueError`` if the range spans more WAL files than ``count``."""
    if count < 1 or end < start:
        raise ValueError(f"cannot cut [{start}, {end}) into {count} pieces")
    pieces: list[tuple[int, int]] = []
    at = start
    while at < end:
        cut = min(end, L.next_boundary(at))
        pieces.append((at, cut))
        at = cut
    if len(pieces) > count:
        raise ValueError(
            f"[{L.format_lsn(start)}, {L.format_lsn(end)}) spans {len(pieces)} WAL files, "
            f"more than its {count} segments (a segment never crosses a WAL file)"
        )
    while len(pieces) < count:
        i = max(range(len(pieces)), key=lambda k: pieces[k][1] - pieces[k][0], default=None)
        if i is None or pieces[i][1] - pieces[i][0] < 2:
            pieces.append((end, end))
            continue
        lo, hi = pieces[i]
        mid = lo + (hi - lo) // 2
        pieces[i : i + 1] = [(lo, mid), (mid, hi)]
    return pieces


def read_span(start: int, end: int) -> tuple[int, int]:
    """Where to read ``[start, end)`` (within one WAL file) in its file: (offset, length),
    from the start of the WAL page holding ``start``, so its page header is checked too."""
    page = start - start % WAL_PAGE_SIZE
    return page % L.WAL_SEGMENT_SIZE, end - page


def wal_bytes(start: int, end: int, data: bytes) -> bytes:
    """``[start, end)`` cut out of ``data``, read from the WAL file at ``read_span``. Every
    page header in it must carry its own address (``xlp_pageaddr``): a recycled or
    foreign file, or a short read, is refused (``ValueError``)."""
    page = start - start % WAL_PAGE_SIZE
    if len(data) != end - page:
        raise ValueError(
            f"read {len(data)} bytes of WAL at {L.format_lsn(page)}, expected {end - page}"
        )
    for offset in range(0, len(data), WAL_PAGE_SIZE):
        if offset + _PAGE_ADDR_AT + _PAGE_ADDR.size > len(data):
            break  # the range ends inside this page's header: the WAL itself holds it
        (addr,) = _PAGE_ADDR.unpack_from(data, offset + _PAGE_ADDR_AT)
        if addr != page + offset:
            raise ValueError(
                f"the WAL page at {L.format_lsn(page + offset)} says it is at "
                f"{L.format_lsn(addr)}: the file does not hold this WAL (recycled?)"
            )
    return data[start - page :]


def build_records(timeline: int, start: int, data: bytes) -> list[bytes]:
    """The records of a replacement segment: ``data`` (the WAL from ``start``, within one
    WAL file) as the WAL source writes it (``lsn.pack_record``), ``RECORD_BYTES`` each."""
    if data and L.segment_start(start) != L.segment_start(start + len(data) - 1):
        raise ValueError(f"WAL from {L.format_lsn(start)} crosses a WAL file")
    return [
        L.pack_record(timeline, start + i, data[i : i + RECORD_BYTES])
        for i in range(0, len(data), RECORD_BYTES)
    ]
