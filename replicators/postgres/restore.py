"""Point-in-time restore from the vault: a running PostgreSQL at a time, an LSN, or the end.

1. The newest base backup that ends before the target is extracted and checked
   (``pg_verifybackup``).
2. The stream's WAL segments are fetched ``PREFETCH`` at a time in parallel,
   each fully verified, checked for continuity and written into a restore
   spool in log order, up to the target (segments before the backup are
   skipped once their header is read).
3. Then the cluster starts with ``recovery.signal``, restore_command serving the
   spool through ``wal-fetch``, the recovery target and
   ``recovery_target_action = promote``; we wait for the promotion and report the
   LSN and the commit time reached. (Replay does not start before the fetch ends:
   PostgreSQL reads the timelines' history files once, at start-up, and one may lie
   anywhere in the fetched WAL.)

Nothing is served to PostgreSQL from a segment that failed verification: the
restore stops with ``IntegrityError`` before the cluster starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from replicators.errors import SourceError
from replicators.keys import KeyProvider
from replicators.logread import LogWalk
from replicators.postgres import leases, locate, pgtools, standby
from replicators.postgres import lsn as L
from replicators.postgres.basebackup import (
    BackupManifest,
    choose_backup,
    extract_backup,
    list_backups,
)
from replicators.postgres.options import PostgresOptions
from replicators.postgres.spool import WalSpool, decode_records
from replicators.segment import SegmentHeader
from replicators.store import ObjectStore
from replicators.vault import Vault

PREFETCH = 8


@dataclass(frozen=True)
class RestoreTarget:
    """``latest``, a time (unix seconds) or an LSN."""

    time: float | None = None
    lsn: int | None = None

    @classmethod
    def parse(cls, text: str) -> RestoreTarget:
        """``latest``, an LSN ``X/Y`` or an ISO-8601 time (UTC when no zone is given)."""
        if text == "latest":
            return cls()
        if "/" in text:
            return cls(lsn=L.parse_lsn(text))
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"--to {text!r}: expected latest, an LSN X/Y or an ISO time") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        return cls(time=when.timestamp())

    def settings(self) -> dict[str, str]:
        out = {"recovery_target_action": "'promote'"}
        if self.time is not None:
            stamp = dt.datetime.fromtimestamp(self.time, dt.UTC).isoformat(sep=" ")
            out["recovery_target_time"] = f"'{stamp}'"
        elif self.lsn is not None:
            out["recovery_target_lsn"] = f"'{L.format_lsn(self.lsn)}'"
        return out


@dataclass(frozen=True)
class RestoreResult:
    backup_id: str
    lsn: str
    replay_time: float | None
    segments: int


async def fill_spool(
    store: ObjectStore,
    keys: KeyProvider,
    stream: str,
    spool: WalSpool,
    *,
    from_lsn: int,
    target: RestoreTarget,
    need_by: int | None = None,
    on_segment: Callable[[int], None] | None = None,
) -> int:
    """Fetch, verify and apply the stream's segments into ``spool`` in log order,
    ``PREFETCH`` in flight, from the one holding ``from_lsn`` (found by ``locate``: the
    segments before it are never read, so a restore reads what it replays, not the
    stream's history). The first segment applied must begin by ``need_by`` (the base
    backup's end; None: no such check): otherwise the WAL that joins the backup to the
    log is not in the vault and the restore refuses (``SourceError``) rather than stop
    short. Returns how many were applied. Raises ``IntegrityError``."""
    vault = Vault(store)
    walk = LogWalk(vault, keys, stream)
    found = await locate.first_needed(vault, keys, stream, from_lsn)
    applied = 0
    blocked: WalGapError | None = None
    reads = walk.read(found.suffix, prefetch=PREFETCH)
    async with contextlib.aclosing(reads) as segments:
        async for ref, opened in segments:  # in log order; only PREFETCH in memory
            header = opened.header
            if int(header.end) <= L.segment_start(from_lsn):
                continue
            gap = _gap(header, opened.records)
            if gap is not None:
                if not _past(target, int(header.start), header.first_source_time):
                    blocked = WalGapError(*gap, header.first_source_time)
                break  # past the target, the gap does not matter: everything needed is here
            if applied == 0 and need_by is not None and int(header.start) > need_by:
                raise SourceError(
                    f"the vault's WAL of stream {stream} begins at "
                    f"{L.format_lsn(int(header.start))}, after the base backup's end "
                    f"{L.format_lsn(need_by)}: the WAL that joins them is not in the vault "
                    "(removed by retention, or never shipped)"
                )
            await spool.apply(ref, header, opened.records)
            applied += 1
            if on_segment:
                on_segment(int(header.end) - int(header.start))
            if _past(target, int(header.start), header.first_source_time):
                break
    if blocked is not None:
        raise blocked
    return applied


class WalGapError(SourceError):
    """The log holds a gap record between the backup and the target: WAL that never
    reached the vault (``replicators.postgres.gaps``)."""

    def __init__(self, start: int, end: int, start_time: float) -> None:
        when = dt.datetime.fromtimestamp(start_time, dt.UTC).isoformat(timespec="seconds")
        super().__init__(
            f"the recovery window has a gap: WAL {L.format_lsn(start)} to {L.format_lsn(end)} "
            f"never reached the vault (the source's slot was re-seeded); the latest point "
            f"restorable before it is {when}"
        )
        self.start, self.end, self.start_time = start, end, start_time


def _gap(header: SegmentHeader, records: list[bytes]) -> tuple[int, int] | None:
    """The gap a segment records, if any: only a segment holding one is decoded here (the
    spool decodes and checks every segment it applies)."""
    if not any(L.is_gap(r) for r in records):
        return None
    for timeline, start, data in decode_records(header, records):
        if start == L.GAP and timeline:
            return L.unpack_gap(data)
    return None


def _past(target: RestoreTarget, start: int, first_time: float) -> bool:
    """True once a segment begins after the target (what follows is not needed)."""
    if target.lsn is not None:
        return start > target.lsn
    if target.time is not None:
        return first_time > target.time + 1.0
    return False


async def restore(
    options: PostgresOptions,
    stream: str,
    store: ObjectStore,
    keys: KeyProvider,
    *,
    target: RestoreTarget,
    data_dir: Path,
    port: int,
    spool_dir: Path | None = None,
    within: float = 600.0,
    on_bytes: Callable[[int], None] | None = None,
) -> RestoreResult:
    """Build, start and promote a cluster at ``target`` in ``data_dir`` (absent or empty).

    A restore that fails removes what it created (the cluster is stopped, the data
    directory emptied, the spool removed), so that running it again works. A time in
    the future is refused at once (it could never be reached). While it runs it holds a
    lease on its restore point (``leases``): retention keeps what it reads."""
    standby.require_empty(data_dir)
    if target.time is not None and target.time > time.time():
        when = dt.datetime.fromtimestamp(target.time, dt.UTC).isoformat(timespec="seconds")
        raise SourceError(f"--to {when} is in the future: the latest restorable point is now")
    # the lease first: a collection that starts from now on keeps what this restore reads
    async with leases.held(store, stream, target_time=target.time, target_lsn=target.lsn):
        return await _leased(
            options, stream, store, keys, target, data_dir, port, spool_dir, within, on_bytes
        )


async def _leased(
    options: PostgresOptions,
    stream: str,
    store: ObjectStore,
    keys: KeyProvider,
    target: RestoreTarget,
    data_dir: Path,
    port: int,
    spool_dir: Path | None,
    within: float,
    on_bytes: Callable[[int], None] | None,
) -> RestoreResult:
    backups = await list_backups(store, keys, stream)
    backup = choose_backup(backups, before_time=target.time, before_lsn=target.lsn)
    spool_path = spool_dir or data_dir.with_name(data_dir.name + ".wal")
    try:
        return await _build(
            options, stream, store, keys, backup, target, data_dir, port, spool_path,
            within, on_bytes,
        )  # fmt: skip
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await standby.stop(options, data_dir)
        await asyncio.to_thread(_remove_created, data_dir, spool_path)
        if isinstance(exc, WalGapError):
            raise SourceError(f"{exc}; {_after_gap(backups, exc.end)}") from None
        raise


def _after_gap(backups: list[BackupManifest], end: int) -> str:
    after = [b for b in backups if b.start_lsn >= end]
    if not after:
        return "no base backup after it is in the vault yet (the agent takes one at once)"
    first = min(after, key=lambda b: b.end_time)
    when = dt.datetime.fromtimestamp(first.end_time, dt.UTC).isoformat(timespec="seconds")
    return f"the earliest restorable point after it is {when} (base backup {first.id})"


def _remove_created(data_dir: Path, spool_path: Path) -> None:
    """Empty the data directory (it was absent or empty) and remove the spool."""
    if data_dir.exists():
        for entry in data_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    shutil.rmtree(spool_path, ignore_errors=True)


async def _build(
    options: PostgresOptions,
    stream: str,
    store: ObjectStore,
    keys: KeyProvider,
    backup: BackupManifest,
    target: RestoreTarget,
    data_dir: Path,
    port: int,
    spool_path: Path,
    within: float,
    on_bytes: Callable[[int], None] | None,
) -> RestoreResult:
    await extract_backup(options, store, keys, backup, data_dir, on_bytes=on_bytes)
    spool = WalSpool(spool_path)
    pgtools.share_with_database(options, spool_path)
    # The spool is filled before PostgreSQL starts: it reads the timelines' history files
    # once, at start-up, to pick the newest timeline, and a history file that arrived
    # later would end recovery at the switch ("unexpected timeline ID"). A history file
    # may lie anywhere in the log after the backup, so the whole fill comes first.
    count = await fill_spool(
        store, keys, stream, spool, from_lsn=backup.start_lsn, target=target,
        need_by=backup.end_lsn, on_segment=on_bytes,
    )  # fmt: skip
    standby.configure(
        options, data_dir, port=port, spool=spool_path, signal="recovery.signal",
        settings=target.settings(),
    )  # fmt: skip
    dsn = f"postgresql://{_user()}@127.0.0.1:{port}/postgres"
    try:
        await standby.start(options, data_dir, wait=False)
        await standby.wait_promoted(dsn, within, data_dir=data_dir)
    except BaseException:
        with contextlib.suppress(Exception):
            await standby.stop(options, data_dir)
        raise
    lsn, replay_time = await standby.replay_position(dsn)
    # Promoted: the cluster no longer reads the restore spool.
    await asyncio.to_thread(shutil.rmtree, spool_path, True)
    return RestoreResult(backup.id, lsn or "", replay_time, count)


def _user() -> str:
    return "postgres"
