"""Building PostgreSQL clusters from the vault: the warm standby and restored copies.

``init_standby`` extracts the newest base backup, points restore_command at
the sink's spool through ``wal-fetch``, writes ``standby.signal`` and starts
the cluster: it then follows the primary, one spool file at a time.
``configure`` and ``start`` are shared with point-in-time restore.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shlex
import time
from collections.abc import Mapping
from pathlib import Path

import asyncpg

from replicators.errors import SourceError
from replicators.keys import KeyProvider
from replicators.postgres import pgtools
from replicators.postgres.basebackup import BackupManifest, extract_backup, list_backups
from replicators.postgres.options import PostgresOptions
from replicators.postgres.walfetch import restore_command
from replicators.store import ObjectStore

CONF_NAME = "dragent-recovery.conf"


def require_empty(data_dir: Path) -> None:
    """Raise ``SourceError`` unless ``data_dir`` is absent or empty (never build over data)."""
    if data_dir.exists() and any(data_dir.iterdir()):
        raise SourceError(f"{data_dir} is not empty: refusing to build a cluster over it")


def _owned(options: PostgresOptions, path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)
    if os.geteuid() == 0:
        user = pwd.getpwnam(options.os_user)
        os.chown(path, user.pw_uid, user.pw_gid)


def configure(
    options: PostgresOptions,
    data_dir: Path,
    *,
    port: int,
    spool: Path,
    signal: str,
    settings: Mapping[str, str] | None = None,
) -> None:
    """Write the recovery settings (in ``postgresql.auto.conf``, read last) and the
    ``standby.signal`` or ``recovery.signal`` file. Idempotent."""
    values = {
        "port": str(port),
        "listen_addresses": "'127.0.0.1'",
        "unix_socket_directories": "''",
        "restore_command": _conf_string(restore_command(spool)),
        "recovery_target_timeline": "'latest'",
        "hot_standby": "on",
        # After a not-yet-complete file, ask wal-fetch again soon (default 5s): this is what
        # lets a standby follow the primary within about a second.
        "wal_retrieve_retry_interval": "'500ms'",
        "archive_mode": "off",
        "synchronous_standby_names": "''",
        **(settings or {}),
    }
    auto = data_dir / "postgresql.auto.conf"
    lines = [
        line
        for line in (auto.read_text().splitlines() if auto.exists() else [])
        if line.split("=")[0].strip() not in values
    ]
    lines += [f"{k} = {v}" for k, v in values.items()]
    _owned(options, auto, "\n".join(lines) + "\n")
    _owned(options, data_dir / signal, "")


async def start(options: PostgresOptions, data_dir: Path, *, wait: bool = True) -> None:
    """``pg_ctl start`` with its log in ``<data_dir>/postgres.log``."""
    log = data_dir / "postgres.log"
    args = ["-D", str(data_dir), "-l", str(log), "-w" if wait else "-W", "start"]
    if wait:
        args[-1:-1] = ["-t", "120"]
    await pgtools.run(options, "pg_ctl", *args)


async def stop(options: PostgresOptions, data_dir: Path) -> None:
    await pgtools.run(options, "pg_ctl", "-D", str(data_dir), "-m", "fast", "-w", "stop")


async def newest_backup(store: ObjectStore, keys: KeyProvider, stream: str) -> BackupManifest:
    backups = await list_backups(store, keys, stream)
    if not backups:
        raise SourceError(
            f"no base backup of stream {stream!r} in the vault: run `dragent backup postgres`"
        )
    return backups[-1]


async def init_standby(
    options: PostgresOptions,
    stream: str,
    store: ObjectStore,
    keys: KeyProvider,
    *,
    data_dir: Path,
    port: int,
    spool: Path,
    run: bool = True,
) -> BackupManifest:
    """Build a standby in ``data_dir`` (must be absent or empty) from the newest backup.

    The standby removes spool files it no longer needs (``archive_cleanup_command``
    with ``pg_archivecleanup`` at each restartpoint), so the spool directory is handed
    to the PostgreSQL OS user."""
    require_empty(data_dir)
    manifest = await newest_backup(store, keys, stream)
    await extract_backup(options, store, keys, manifest, data_dir)
    pgtools.share_with_database(options, spool)
    program = shlex.quote(str(pgtools.bin_dir(options) / "pg_archivecleanup"))
    cleanup = _conf_string(f"{program} {shlex.quote(str(spool))} %r")
    configure(
        options, data_dir, port=port, spool=spool, signal="standby.signal",
        settings={"archive_cleanup_command": cleanup},
    )  # fmt: skip
    if run:
        await start(options, data_dir)
    return manifest


async def replay_position(dsn: str) -> tuple[str | None, float | None]:
    """A standby's last replayed LSN and the commit time of its last replayed transaction."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await read_replay_position(conn)
    finally:
        await conn.close()


async def read_replay_position(conn: asyncpg.Connection) -> tuple[str | None, float | None]:
    """``replay_position`` over an open connection."""
    row = await conn.fetchrow(
        "SELECT pg_last_wal_replay_lsn()::text AS lsn, "
        "extract(epoch FROM pg_last_xact_replay_timestamp())::float8 AS t"
    )
    assert row is not None
    return row["lsn"], row["t"]


async def wait_promoted(dsn: str, within: float, *, data_dir: Path | None = None) -> None:
    """Wait until the cluster at ``dsn`` accepts writes (recovery finished). With
    ``data_dir``, raise ``SourceError`` with the log's tail as soon as the server has
    exited (e.g. the recovery target lies beyond the WAL in the vault)."""
    deadline = time.monotonic() + within
    started = time.monotonic()
    while True:
        if (
            data_dir is not None
            and time.monotonic() - started > 5.0
            and not await asyncio.to_thread((data_dir / "postmaster.pid").exists)
        ):
            tail = await asyncio.to_thread(_log_tail, data_dir)
            raise SourceError(f"PostgreSQL stopped during recovery:\n{tail}")
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                    return
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass
        if time.monotonic() > deadline:
            raise SourceError(f"recovery did not finish within {within:.0f}s")
        await asyncio.sleep(0.2)


def _log_tail(data_dir: Path, lines: int = 8) -> str:
    try:
        text = (data_dir / "postgres.log").read_text(errors="replace")
    except OSError:
        return "    (no postgres.log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def _conf_string(value: str) -> str:
    """``value`` as a postgresql.conf string literal (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"
