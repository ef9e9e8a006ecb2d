"""Failback: re-seed the old primary's region as a standby of the new primary.

``reseed(cluster, source_dsn)`` stops the old cluster, runs ``pg_rewind``
against the new primary (writing the standby configuration with ``-R``) and,
when a rewind is impossible (no ``wal_log_hints``/checksums, WAL already
recycled, a broken data directory), takes a fresh base backup instead. It
then starts the cluster as a standby and waits until it is ready. The
cluster's own configuration files (``*.conf`` in the data directory), which
both tools overwrite with the new primary's, are put back first; of the new
primary's ``postgresql.auto.conf`` only how to follow it (primary_conninfo,
primary_slot_name) is kept, never its port or its restore_command (which
names the other region's spool). The own configuration is saved beside the
data directory until the re-seed finished, so running it again after a
failure continues from the right files. Traffic moves back with a planned
switchover once it has caught up.

``LocalCluster`` is the cluster a region's config names
(``postgres_data_dir``, ``postgres_bin_dir``, ``postgres_os_user``); the lab's
``PostgresServer`` has the same shape.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Protocol

import asyncpg

from agent.coordination.takeover import CatchUpError, current_lsn, wait_lsn
from replicators.errors import DragentError
from replicators.postgres.pgtools import conninfo_and_env


class FailbackError(DragentError):
    """The old region could not be re-seeded."""


class Cluster(Protocol):
    data_dir: Path

    def command(self, program: str, *args: str) -> list[str]: ...

    async def stop(self) -> None: ...

    async def start(self) -> None: ...

    async def wait_ready(self) -> None: ...


class LocalCluster:
    """A PostgreSQL cluster on this host, driven with pg_ctl as its OS user."""

    def __init__(self, data_dir: Path, bin_dir: Path, os_user: str | None, dsn: str) -> None:
        self.data_dir = data_dir
        self.bin_dir = bin_dir
        self.os_user = os_user
        self.dsn = dsn

    def command(self, program: str, *args: str) -> list[str]:
        prefix = ["runuser", "-u", self.os_user, "--"] if self.os_user else []
        return [*prefix, str(self.bin_dir / program), *args]

    async def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            await run(self.command("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop"))

    async def start(self) -> None:
        log = self.data_dir / "failback-start.log"
        argv = self.command("pg_ctl", "-D", str(self.data_dir), "-l", str(log), "-w", "start")
        try:
            await run(argv)
        except FailbackError as exc:
            tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
            raise FailbackError(f"{exc}; {log}: " + " | ".join(tail)) from None

    async def wait_ready(self) -> None:
        async with asyncio.timeout(60):
            while True:
                try:
                    conn = await asyncpg.connect(self.dsn)
                except (OSError, asyncpg.PostgresError):
                    await asyncio.sleep(0.2)
                    continue
                await conn.close()
                return


async def run(argv: list[str], env: dict[str, str] | None = None) -> str:
    """Run a program; return its output; raise FailbackError on a non-zero exit. A
    password goes in ``env`` (``PGPASSWORD``), never in ``argv``."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd="/", env=env
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode:
        # argv may hold a DSN with a password: name only the program
        program = next((Path(a).name for a in argv if a.startswith("/")), argv[0])
        raise FailbackError(f"{program} exited {proc.returncode}: {text[-800:]}")
    return text


async def reseed(
    cluster: Cluster,
    source_dsn: str,
    cluster_dsn: str,
    *,
    allow_basebackup: bool = True,
    within: float = 20.0,
) -> str:
    """Make ``cluster`` a standby of ``source_dsn`` and check it follows (it replays
    the source's current LSN within ``within`` seconds); return ``"rewind"`` or
    ``"basebackup"``. Idempotent. Raises ``FailbackError``.

    pg_rewind reports "no rewind required" when the old primary's last record
    is the shutdown checkpoint written right at the fork point (it was fenced
    read-only, not stopped, during the switchover); such a cluster cannot
    follow the new timeline, so the follow check falls back to a base backup.
    """
    own = _own_config(cluster.data_dir)
    try:
        await _rewind(cluster, source_dsn)
        _restore_config(cluster.data_dir, own)
        await _start_standby(cluster, source_dsn)
        # a rewound standby follows at once or never: a short check
        await _check_follows(cluster_dsn, source_dsn, min(within, 8.0))
        forget_saved(cluster.data_dir)
        return "rewind"
    except (FailbackError, CatchUpError, OSError, asyncpg.PostgresError):
        if not allow_basebackup:
            raise
    await cluster.stop()
    await _fresh_copy(cluster, source_dsn)
    _restore_config(cluster.data_dir, own)
    await _start_standby(cluster, source_dsn)
    try:
        await _check_follows(cluster_dsn, source_dsn, within)
    except CatchUpError as exc:
        raise FailbackError(f"the re-seeded cluster does not follow: {exc}") from None
    forget_saved(cluster.data_dir)
    return "basebackup"


async def _rewind(cluster: Cluster, source_dsn: str) -> None:
    await cluster.stop()
    data = str(cluster.data_dir)
    conninfo, env = conninfo_and_env(source_dsn)
    await run(cluster.command("pg_rewind", "-D", data, f"--source-server={conninfo}", "-R"), env)


async def _check_follows(cluster_dsn: str, source_dsn: str, within: float) -> None:
    await wait_lsn(cluster_dsn, await current_lsn(source_dsn), within)


async def _start_standby(cluster: Cluster, source_dsn: str) -> None:
    signal = cluster.data_dir / "standby.signal"
    if not signal.exists():
        signal.touch()
        _same_owner(signal, cluster.data_dir)
    auto = cluster.data_dir / "postgresql.auto.conf"
    if "primary_conninfo" not in auto.read_text():
        # pg_rewind writes it only when it rewound; "no rewind required" leaves none
        quoted = source_dsn.replace("'", "''")
        with auto.open("a") as f:
            f.write(f"primary_conninfo = '{quoted}'\n")
    await cluster.start()
    await cluster.wait_ready()


async def _fresh_copy(cluster: Cluster, source_dsn: str) -> None:
    for entry in cluster.data_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    conninfo, env = conninfo_and_env(source_dsn)
    await run(
        cluster.command(
            "pg_basebackup",
            "-D",
            str(cluster.data_dir),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "-d",
            conninfo,
        ),
        env,
    )


AUTO = "postgresql.auto.conf"
SAVED = ".dragent-failback-config.json"
"""Beside the data directory: the cluster's own configuration while a re-seed runs, so
that a re-seed interrupted after the tools overwrote it starts again from the right one."""

FOLLOW = ("primary_conninfo", "primary_slot_name")
"""Settings taken from the new primary's copy: how to follow it."""
ROLE = (*FOLLOW, "restore_command", "archive_cleanup_command", "recovery_end_command")
"""Settings that say how a cluster follows or archives: never copied from another region
(a restore_command names that region's spool)."""


def _saved_path(data_dir: Path) -> Path:
    return data_dir.parent / f"{data_dir.name}{SAVED}"


def _own_config(data_dir: Path) -> dict[str, str]:
    """The cluster's own configuration files — every ``*.conf`` at the top of its data
    directory (postgresql.conf, pg_hba.conf, postgresql.auto.conf and whatever they
    include). pg_rewind and pg_basebackup overwrite them with the new primary's (its
    port, addresses, access rules, its restore_command); a re-seed puts them back.
    Saved beside the data directory first, and read from there by a re-seed that an
    interruption left half done."""
    saved = _saved_path(data_dir)
    if saved.exists():
        return dict(json.loads(saved.read_text()))
    files = {
        p.name: p.read_text() for p in data_dir.glob("*.conf") if p.is_file() and not p.is_symlink()
    }
    try:
        saved.write_text(json.dumps(files))
        saved.chmod(0o600)
    except OSError:  # a directory we may not write: the re-seed works, a rerun re-reads
        pass
    return files


def merge_auto_conf(own: str, new: str) -> str:
    """``own``'s settings for this cluster's place (port, paths...) without any of the
    ``ROLE`` settings it had, plus how to follow the new primary from ``new``."""
    kept = [line for line in own.splitlines() if _setting(line) not in ROLE]
    follow = [line for line in new.splitlines() if _setting(line) in FOLLOW]
    return "\n".join(kept + follow) + "\n"


def _setting(line: str) -> str | None:
    text = line.strip()
    if not text or text.startswith("#") or "=" not in text:
        return None
    return text.split("=", 1)[0].strip().lower()


def _restore_config(data_dir: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        path = data_dir / name
        if name == AUTO and path.exists():
            content = merge_auto_conf(content, path.read_text())
        path.write_text(content)
        _same_owner(path, data_dir)


def forget_saved(data_dir: Path) -> None:
    """After a re-seed that finished: the saved configuration is no longer needed."""
    _saved_path(data_dir).unlink(missing_ok=True)


def _same_owner(path: Path, like: Path) -> None:
    st = like.stat()
    if os.geteuid() == 0:
        os.chown(path, st.st_uid, st.st_gid)
