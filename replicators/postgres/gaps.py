"""Gaps in a PostgreSQL stream's log: WAL a destination vault never received.

A physical slot that no longer holds the WAL at the stream's durable position
(invalidated by ``max_slot_wal_keep_size``, dropped, or lost with the data
directory when a failback re-seeded the cluster) cannot be streamed from
there again. The source then re-seeds: it streams from the slot's own start
and writes a gap record ``[from, to)`` into the log (``lsn.pack_gap``), so
readers know that nothing in between exists, and records the gap here, one
file per gap under ``<data_dir>/gaps/``:

- the active side's backup job takes a base backup at once while a gap is not
  *covered* (no base backup starting at or after its end), and marks it
  covered once one is stored;
- until then the stream's RPO counts from the gap's start (a disaster would
  lose everything after it: the vault cannot restore past the gap);
- the compliance monitor appends each gap to the evidence log
  (``stream.gap``): a hole in the recovery window, kept for the auditor.

Files are written crash-safely; recording the same gap twice gives one file.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from replicators import checkpoint
from replicators.postgres import lsn as L

DIRECTORY = "gaps"


@dataclass(frozen=True)
class Gap:
    stream: str
    peer: str
    slot: str
    start: int
    end: int
    timeline: int
    start_time: float | None
    """Source time of the last change before the gap that is durable (None: unknown)."""
    found_at: float
    reason: str
    covered_by: str | None = None
    """The id of the first base backup that starts after the gap."""

    @property
    def id(self) -> str:
        return f"{self.stream}--{self.peer}--{self.start:016X}"

    def describe(self) -> dict[str, object]:
        """For logs, the evidence log and /status: LSNs written as PostgreSQL writes them."""
        out = asdict(self)
        out["start"], out["end"] = L.format_lsn(self.start), L.format_lsn(self.end)
        return out


def record(directory: Path, gap: Gap) -> Path:
    """Write (or rewrite) the file of ``gap``; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{gap.id}.json"
    checkpoint.save(path, asdict(gap))
    return path


def load(directory: Path, stream: str | None = None, peer: str | None = None) -> list[Gap]:
    """Every gap recorded (of ``stream`` and ``peer`` when given), oldest first. A file
    that is not a gap is skipped."""
    out = []
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            gap = Gap(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if (stream is None or gap.stream == stream) and (peer is None or gap.peer == peer):
            out.append(gap)
    return sorted(out, key=lambda g: (g.start, g.found_at))


def uncovered(gaps: list[Gap]) -> list[Gap]:
    return [g for g in gaps if g.covered_by is None]


def cover(directory: Path, gaps: list[Gap], backup_id: str, backup_start: int) -> list[Gap]:
    """Mark covered every gap that ends at or before ``backup_start`` (a base backup
    starting there needs no WAL from before it); returns those newly covered."""
    done = []
    for gap in uncovered(gaps):
        if gap.end <= backup_start:
            covered = Gap(**{**asdict(gap), "covered_by": backup_id})
            record(directory, covered)
            done.append(covered)
    return done


def unrestorable_since(gaps: list[Gap]) -> float | None:
    """The source time from which the vault cannot restore (the oldest uncovered gap's
    start), or None. A gap of unknown start time counts from when it was found."""
    times = [g.start_time if g.start_time is not None else g.found_at for g in uncovered(gaps)]
    return min(times) if times else None


class GapBook:
    """The gaps of one stream and destination, re-read at most once a second."""

    def __init__(self, directory: Path, stream: str, peer: str) -> None:
        self.directory = directory
        self.stream = stream
        self.peer = peer
        self._cached: list[Gap] = []
        self._read_at = 0.0

    def gaps(self) -> list[Gap]:
        now = time.monotonic()
        if now - self._read_at >= 1.0:
            self._cached, self._read_at = load(self.directory, self.stream, self.peer), now
        return self._cached

    def add(self, gap: Gap) -> None:
        record(self.directory, gap)
        self.forget()

    def forget(self) -> None:
        """Read the files again at the next call (they were changed here)."""
        self._read_at = 0.0

    def unrestorable_since(self) -> float | None:
        return unrestorable_since(self.gaps())
