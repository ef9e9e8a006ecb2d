"""The garbage collector of a PostgreSQL stream's vault (``retention.py`` is the plan).

``collect`` gathers the facts (the stream's segments and backups, where the floor
backup's WAL begins, this region's standby position), plans, and deletes in the
plan's order. Object Lock is respected, never fought: a delete the store refuses
(``AccessDenied``: a locked version) is skipped and reported, and the pass goes on.
On a versioned bucket (one with Object Lock is) a plain DELETE only hides an object
behind a delete marker; the collector deletes every version of the key (``purge``),
so what it reports deleted is gone.

Each pass leaves a ``GcResult``: what it deleted and skipped, the recovery window
after it (the oldest point a restore can reach) and the vault's bytes and objects
for the stream, which the daemon exports (``pgmetrics``) and records as evidence
(``<data_dir>/gc/``, read by the compliance monitor).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from replicators import lineage
from replicators.errors import AccessDenied, IntegrityError, NotFound, StorageError
from replicators.keys import KeyProvider, unseal
from replicators.postgres import basebackup, leases, locate, retention
from replicators.postgres.basebackup import (
    BackupManifest,
    backup_prefix,
    choose_backup,
    list_backups,
)
from replicators.postgres.retention import Policy
from replicators.store import ObjectStore
from replicators.vault import SegmentRef, Vault

DIRECTORY = "gc"


@dataclass
class GcResult:
    stream: str
    at: float
    dry_run: bool
    window: float
    """The policy's recovery window (seconds)."""
    oldest_point: float | None = None
    """The oldest time a restore can reach after this pass (None: nothing restorable)."""
    floor_backup: str | None = None
    kept_backups: list[str] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)
    deleted: dict[str, int] = field(default_factory=dict)
    """Objects deleted (or, in a dry run, to delete) by kind: manifest, segment, ..."""
    bytes_deleted: int = 0
    locked: list[str] = field(default_factory=list)
    """Keys the store refused to delete (Object Lock): left in place."""
    leases: list[str] = field(default_factory=list)
    """Live leases of running restores, whose restore points were kept."""
    first_deleted: str | None = None
    last_deleted: str | None = None
    vault_bytes: dict[str, int] = field(default_factory=dict)
    vault_objects: dict[str, int] = field(default_factory=dict)
    """What the stream holds in the vault after the pass, by kind (segments, backups)."""

    @property
    def recovery_window(self) -> float:
        """Seconds from the oldest reachable restore point to the pass (0: none)."""
        return max(0.0, self.at - self.oldest_point) if self.oldest_point else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "recovery_window": self.recovery_window}


def default_keys(manifest: BackupManifest) -> set[str]:
    """Every key a backup needs: ``basebackup.backup_keys`` where it exists, else the
    manifest and the parts it lists."""
    keys_of: Callable[[BackupManifest], set[str]] | None = getattr(basebackup, "backup_keys", None)
    if keys_of is not None:
        return keys_of(manifest)
    return {retention.manifest_key(manifest.stream, manifest.id)} | {
        p["key"] for p in manifest.parts
    }


async def collect(
    store: ObjectStore,
    keys: KeyProvider,
    stream: str,
    policy: Policy,
    *,
    applied: SegmentRef | None = None,
    hold_segments: bool = False,
    dry_run: bool = False,
    now: float | None = None,
    on_delete: Callable[[str, str], None] | None = None,
) -> GcResult:
    """One collection of ``stream`` in the vault ``store``; see the module docstring.
    ``applied``/``hold_segments``: this region's standby (``retention.plan``)."""
    now = time.time() if now is None else now
    vault = Vault(store)
    sizes: dict[str, int] = {}
    segments: list[SegmentRef] = []
    async for info in store.list(f"streams/{stream}/"):
        try:
            ref = SegmentRef.parse(info.key)
        except IntegrityError:  # not a segment name: not ours to judge
            continue
        if ref.stream == stream:
            segments.append(ref)
            sizes[info.key] = info.size
    prefixes: dict[str, list[str]] = {}
    async for info in store.list(backup_prefix(stream)):
        parts = info.key[len(backup_prefix(stream)) :].split("/", 1)
        if len(parts) == 2:
            prefixes.setdefault(parts[0], []).append(info.key)
            sizes[info.key] = info.size
    backups = await list_backups(store, keys, stream)
    stale = set(lineage.stale(segments))
    live = [r for r in segments if r not in stale]
    seen: set[str] = set()
    expired: list[leases.Lease] = []
    for _ in range(5):  # plan again while new leases appear (a restore that just began)
        found_leases = await leases.leases(store, stream)
        current = [x for x in found_leases if x.live(time.time())]
        expired = [x for x in found_leases if not x.live(time.time())]
        if seen and {x.id for x in current} <= seen:
            break
        seen = {x.id for x in current}
        keep_from = _leased(backups, current)
        cut: SegmentRef | None = None
        i0 = retention.floor_backup(backups, now, policy)
        i0 = i0 if keep_from is None else min(i0, keep_from)
        if backups:
            found = await locate.first_needed(vault, keys, stream, backups[i0].start_lsn, live)
            cut = found.suffix[0] if found.suffix else None
        todo = retention.plan(
            stream, backups, prefixes, segments, cut, now, policy, default_keys,
            applied=applied, hold_segments=hold_segments, keep_from=keep_from,
        )  # fmt: skip
    result = GcResult(
        stream=stream, at=now, dry_run=dry_run, window=policy.window,
        floor_backup=todo.floor.id if todo.floor else None, kept_backups=todo.kept_backups,
        in_progress=todo.in_progress, leases=sorted(seen),
    )  # fmt: skip
    gone: set[str] = set()
    if not dry_run:
        for lease in expired:  # its holder died: it protects nothing any more
            with contextlib.suppress(StorageError):
                await store.delete(lease.key)
    for kind, key in todo.steps():
        if not dry_run:
            try:
                await _purge(store, key)
            except AccessDenied:
                result.locked.append(key)
                continue
        gone.add(key)
        result.deleted[kind] = result.deleted.get(kind, 0) + 1
        result.bytes_deleted += sizes.get(key, 0)
        result.first_deleted = result.first_deleted or key
        result.last_deleted = key
        if on_delete:
            on_delete(kind, key)
    left_backups = [b for b in backups if retention.manifest_key(stream, b.id) not in gone]
    left_log = [r for r in live if r.key not in gone]
    result.oldest_point = await _oldest_point(vault, keys, left_backups, left_log)
    for key, size in sizes.items():
        if key in gone:
            continue
        kind = "segments" if key.startswith("streams/") else "backups"
        result.vault_bytes[kind] = result.vault_bytes.get(kind, 0) + size
        result.vault_objects[kind] = result.vault_objects.get(kind, 0) + 1
    return result


def _leased(backups: list[BackupManifest], live: list[leases.Lease]) -> int | None:
    """The index of the oldest backup a live lease's target needs (None: no lease)."""
    found = []
    for lease in live:
        if lease.target_time is None and lease.target_lsn is None:
            found.append(len(backups) - 1)  # the latest: the newest backup
            continue
        with contextlib.suppress(NotFound):
            chosen = choose_backup(
                backups, before_time=lease.target_time, before_lsn=lease.target_lsn
            )
            found.append(backups.index(chosen))
    return min(found) if found else None


async def _oldest_point(
    vault: Vault, keys: KeyProvider, backups: list[BackupManifest], log: list[SegmentRef]
) -> float | None:
    if not log:
        return None
    first = log[0]
    opened = await unseal(
        await vault.get_segment(first), keys,
        expect_stream=first.stream, expect_epoch=first.epoch, expect_seq=first.seq,
    )  # fmt: skip
    oldest = retention.oldest_point(backups, int(opened.header.start))
    return oldest.end_time if oldest else None


async def _purge(store: ObjectStore, key: str) -> None:
    """Delete every version of ``key`` (``purge``, where the store has it)."""
    purge = getattr(store, "purge", None)
    if purge is not None:
        await purge(key)
    else:
        await store.delete(key)


def record(data_dir: Path, result: GcResult) -> Path | None:
    """Keep the pass: always as the stream's latest (``<data_dir>/gc/latest-<stream>.json``,
    with ``first_seen``, the first pass ever, so that a vault younger than the policy's
    window is told apart from one cut short), and as a pass of its own when it deleted or
    skipped something, for the evidence log (``<stream>-<ms>.json``). Files are written
    whole or not at all. Returns the pass file, if one was written."""
    if result.dry_run:
        return None
    directory = data_dir / DIRECTORY
    directory.mkdir(parents=True, exist_ok=True)
    data = result.to_json()
    before = latest(data_dir).get(result.stream, {})
    data["first_seen"] = min(float(before.get("first_seen", result.at)), result.at)
    _write(directory / f"latest-{result.stream}.json", data)
    if not (result.deleted or result.locked):
        return None
    path = directory / f"{result.stream}-{int(result.at * 1000)}.json"
    _write(path, data)
    return path


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load(data_dir: Path) -> list[dict[str, Any]]:
    """Every recorded pass that deleted or skipped something, oldest first."""
    directory = data_dir / DIRECTORY
    if not directory.is_dir():
        return []
    found = (_read(p) for p in directory.glob("*.json") if not p.name.startswith("latest-"))
    return sorted((d for d in found if d), key=lambda r: r.get("at", 0))


def latest(data_dir: Path) -> dict[str, dict[str, Any]]:
    """The latest pass of each stream, by stream name."""
    directory = data_dir / DIRECTORY
    if not directory.is_dir():
        return {}
    found = (_read(p) for p in directory.glob("latest-*.json"))
    return {d["stream"]: d for d in found if d and isinstance(d.get("stream"), str)}
