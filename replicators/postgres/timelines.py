"""Following a timeline switch: which timelines to stream, and the timeline of each byte.

A server promoted from a standby (timeline N+1) still holds, in its ``pg_wal``, the
old timeline's WAL up to the switch point for as long as it keeps those files. A
stream whose shipped WAL ends on timeline N, at or before the switch point, can
therefore go on without a gap: ``START_REPLICATION ... TIMELINE N`` from its
position up to the switch point (the server then ends the copy), then
``START_REPLICATION ... TIMELINE N+1`` from the switch point: one *leg* per timeline.

The switch point's WAL file is kept under the old timeline's name in the log (its
bytes after the switch point are labelled with the old timeline too): the part of
that file before the stream's resume position was shipped under the old name
already, and PostgreSQL's recovery, finding no file of the new timeline for that
segment, reads the old timeline's one and switches timeline at the end-of-recovery
record. From the next WAL file on, bytes carry the new timeline.

Pure functions over the content of a timeline history file
(``TIMELINE_HISTORY``: ``<parent tli> <TAB> <switch LSN> <TAB> <reason>`` lines).
"""

from __future__ import annotations

from dataclasses import dataclass

from replicators.postgres import lsn as L


@dataclass(frozen=True)
class Leg:
    """Stream ``timeline`` from ``start``; the server ends it at ``until`` (None: the
    server's current timeline, no end)."""

    timeline: int
    start: int
    until: int | None


def parse_history(content: bytes | str) -> list[tuple[int, int]]:
    """A history file's (timeline, switch point) entries, oldest first: WAL of
    ``timeline`` ends at its switch point. Raises ``ValueError`` on a malformed line."""
    text = content.decode() if isinstance(content, bytes) else content
    out: list[tuple[int, int]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2:
            raise ValueError(f"history line without a switch point: {line!r}")
        out.append((int(fields[0]), L.parse_lsn(fields[1])))
    return out


def timeline_of(position: int, history: list[tuple[int, int]], current: int) -> int:
    """The timeline that holds ``position`` in a server's history (PostgreSQL's
    ``tliOfPointInHistory``): the first whose switch point lies after it."""
    for timeline, switch in history:
        if position < switch:
            return timeline
    return current


def switch_point(timeline: int, history: list[tuple[int, int]]) -> int | None:
    """Where ``timeline`` ends in ``history`` (None: not a past timeline of it)."""
    for t, switch in history:
        if t == timeline:
            return switch
    return None


def plan(
    position: int, shipped: int, current: int, history: list[tuple[int, int]]
) -> tuple[list[Leg] | None, str | None]:
    """The legs that take a stream at ``position`` (its WAL so far on timeline
    ``shipped``; 0: unknown, then the timeline the history gives ``position``) to the
    server's ``current`` timeline. ``(None, None)``: nothing to follow (``position`` is on
    the current timeline). ``(None, why)``: it cannot be followed (the server's history
    forked from ``shipped`` before ``position``, or does not hold ``shipped`` at all)."""
    timeline = shipped or timeline_of(position, history, current)
    if timeline == current:
        return None, None
    end = switch_point(timeline, history)
    if end is None:
        return None, f"timeline {timeline} is not in the history of timeline {current}"
    if position > end:
        return None, (
            f"the history of timeline {current} forked from timeline {timeline} at "
            f"{L.format_lsn(end)}, before the shipped position {L.format_lsn(position)}"
        )
    legs: list[Leg] = []
    start = position
    for t, switch in history:
        if t < timeline or switch < start:
            continue
        if switch > start:
            legs.append(Leg(t, start, switch))
        start = switch
    legs.append(Leg(current, start, None))
    return legs, None


def file_to_read(legs: list[Leg]) -> str:
    """The WAL file the server reads first for ``legs[0]``: a leg's last segment is read
    from the next timeline's file (walsender's ``WalSndSegmentOpen``)."""
    first = legs[0]
    timeline = first.timeline
    if first.until is not None and L.segment_start(first.start) == L.segment_start(first.until - 1):
        timeline = legs[1].timeline
    return L.wal_file_name(timeline, first.start)


def label(position: int, floor: int, history: list[tuple[int, int]], current: int) -> int:
    """The timeline a WAL byte at ``position`` is recorded under, on a stream that
    followed a switch from timeline ``floor``: the timeline of its WAL file's first byte
    (a switch point's file keeps the old timeline's name), never below ``floor``."""
    return max(floor, timeline_of(L.segment_start(position), history, current))
