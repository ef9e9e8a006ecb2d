"""Retention of a PostgreSQL stream's vault: what the recovery window needs, and in what
order the rest is deleted. Pure: the garbage collector (``gc.py``) gathers the facts
and carries the plan out.

**What a restore point needs.** A restore to a time ``t`` starts from the newest base
backup that ends by ``t`` and replays the log from the WAL file holding that backup's
start (``restore.fill_spool``). So every point of the window ``[now - window, now]``
is served by the backups from ``floor`` on, where ``floor`` is the newest backup that
ends by ``now - window`` (or the oldest, when none does), and by the segments from the
one holding ``floor.start_lsn`` on. ``keep_backups`` can only move ``floor`` back.
Everything older is not needed by any point in the window: the backups before
``floor`` and the segments before that one.

**The order of deletion, and why a kill -9 anywhere is safe.**

1. the manifests of the backups to delete: each such backup is incomplete from then on,
   and a restore never starts from it (so no restore can begin from a backup whose WAL
   step 2 removed);
2. the segments before the cut, oldest first (what is left of the log is always one
   unbroken tail of it; segments of superseded epochs before the cut go too);
3. the other objects of those backups, and of backups whose manifest never came
   (orphans older than ``orphan_grace``), except every key a kept backup references
   (an incremental backup references packs of the one before it).

No step touches a kept backup's keys or a segment from the cut on, so every point of
the window stays restorable after any prefix of the plan; running GC again finishes it.
The newest segment of the log is never deleted (a shipper that lost its checkpoint
numbers its next segment from it), nor any segment this region's standby has not
applied yet.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from replicators.postgres.basebackup import BackupManifest, backup_prefix
from replicators.vault import SegmentRef


class Policy(Protocol):
    """``replicators.settings.RetentionConfig`` as the plan reads it."""

    @property
    def window(self) -> float: ...

    @property
    def keep_backups(self) -> int: ...

    @property
    def orphan_grace(self) -> float: ...


def floor_backup(backups: list[BackupManifest], now: float, policy: Policy) -> int:
    """The index in ``backups`` (complete, oldest first) of the oldest backup to keep:
    the newest that ends by the window's start (or the oldest), moved back to keep
    ``keep_backups``. 0 keeps them all. Pure."""
    if not backups or policy.window <= 0:
        return 0
    start = now - policy.window
    by_window = max((i for i, b in enumerate(backups) if b.end_time <= start), default=0)
    by_count = max(0, len(backups) - policy.keep_backups)
    return min(by_window, by_count)


def manifest_key(stream: str, backup_id: str) -> str:
    return f"{backup_prefix(stream, backup_id)}manifest.seg"


def backup_started(backup_id: str) -> float | None:
    """A backup id's start time (``YYYYMMDDTHHMMSSZ``, UTC), or None if it is not one."""
    try:
        return float(calendar.timegm(time.strptime(backup_id, "%Y%m%dT%H%M%SZ")))
    except ValueError:
        return None


@dataclass
class Plan:
    """What one collection deletes, in order (``steps``), and what it keeps."""

    floor: BackupManifest | None
    kept_backups: list[str]
    manifests: list[str] = field(default_factory=list)
    segments: list[SegmentRef] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)
    """Backups without a manifest, younger than the grace: left alone."""

    def steps(self) -> list[tuple[str, str]]:
        """(kind, key) in the order they must be deleted."""
        return (
            [("manifest", k) for k in self.manifests]
            + [("segment", r.key) for r in self.segments]
            + [("backup object", k) for k in self.objects]
        )


def plan(
    stream: str,
    backups: list[BackupManifest],
    prefixes: Mapping[str, Iterable[str]],
    segments: list[SegmentRef],
    cut: SegmentRef | None,
    now: float,
    policy: Policy,
    keys_of: Callable[[BackupManifest], set[str]],
    applied: SegmentRef | None = None,
    hold_segments: bool = False,
    keep_from: int | None = None,
) -> Plan:
    """The collection of one stream's vault. Pure.

    ``backups``: the complete ones, oldest first; ``prefixes``: every backup id found
    under ``backups/<stream>/`` and its keys (manifest or not); ``segments``: every
    segment of the stream, stale ones included, in log order; ``cut``: the first
    segment the floor backup needs (``locate.first_needed``), None when the log has none
    it needs (then only segments before the newest go); ``applied``: the last segment
    this region's standby applied (nothing after it is deleted); ``hold_segments``: keep
    every segment (a standby here whose position is unknown); ``keep_from``: the index
    of the oldest backup a live lease needs (``leases``), which the floor never passes."""
    i0 = floor_backup(backups, now, policy)
    if keep_from is not None:
        i0 = min(i0, keep_from)
    floor = backups[i0] if backups else None
    kept = backups[i0:]
    out = Plan(floor=floor, kept_backups=[b.id for b in kept])
    keep_keys: set[str] = set()
    for b in kept:
        keep_keys |= keys_of(b)
    expired = backups[:i0]
    out.manifests = [manifest_key(stream, b.id) for b in expired]
    if floor is not None and not hold_segments and segments:
        limit = segments[-1]  # the newest is never deleted
        if cut is not None:
            limit = min(limit, cut)
        out.segments = [r for r in segments if r < limit and (applied is None or r <= applied)]
    complete = {b.id for b in backups}
    doomed = {b.id for b in expired}
    for backup_id, keys in sorted(prefixes.items()):
        if backup_id not in complete:
            started = backup_started(backup_id)
            if started is None or now - started < policy.orphan_grace:
                out.in_progress.append(backup_id)
                continue
            doomed.add(backup_id)
        if backup_id in doomed:
            out.objects.extend(
                k for k in sorted(keys) if k not in keep_keys and k not in out.manifests
            )
    return out


def oldest_point(backups: list[BackupManifest], log_start: int | None) -> BackupManifest | None:
    """The oldest backup a restore can start from: complete, and joined to the log (the
    log's first segment begins by the backup's end). None: nothing is restorable."""
    if log_start is None:
        return None
    joined = [b for b in backups if log_start <= b.end_lsn]
    return min(joined, key=lambda b: b.end_time) if joined else None
