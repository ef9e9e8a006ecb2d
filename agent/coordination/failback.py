"""Failback: re-seed the old primary's region as a standby of the new primary.

``reseed(cluster, source_dsn)`` stops the old cluster, runs ``pg_rewind``
against the new primary (writing the standby configuration with ``-R``) and,
when a rewind is impossible (no ``wal_log_hints``/checksums, WAL already
recycled, a broken data directory), takes a fresh base backup instead. It
then starts the cluster as a standby and waits until it is ready; the cluster's
own configuration files (``*.conf`` in the data directory but
``postgresql.auto.conf``), which both tools overwrite with the new primary's,
are put back first. Traffic
moves back with a planned switchover once it has caught up.

``LocalCluster`` is the cluster a region's config names
(``postgres_data_dir``, ``postgres_bin_dir``, ``postgres_os_user``); the lab's
``PostgresServer`` has the same shape.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Protocol

import asyncpg

from agent.coordination.takeover import CatchUpError, current_lsn, wait_lsn
from replicators.errors import DragentError


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


async def run(argv: list[str]) -> str:
    """Run a program; return its output; raise FailbackError on a non-zero exit."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd="/"
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
    return "basebackup"


async def _rewind(cluster: Cluster, source_dsn: str) -> None:
    await cluster.stop()
    data = str(cluster.data_dir)
    await run(cluster.command("pg_rewind", "-D", data, f"--source-server={source_dsn}", "-R"))


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
            source_dsn,
        )
    )


KEEP = "postgresql.auto.conf"
"""The one configuration file taken from the new primary (it carries primary_conninfo)."""


def _own_config(data_dir: Path) -> dict[str, bytes]:
    """The cluster's own configuration files — every ``*.conf`` at the top of its data
    directory (postgresql.conf, pg_hba.conf, pg_ident.conf and whatever they include)
    but ``postgresql.auto.conf``. pg_rewind and pg_basebackup overwrite them with the new
    primary's (its port, addresses, access rules); a re-seed puts them back."""
    return {
        p.name: p.read_bytes()
        for p in data_dir.glob("*.conf")
        if p.is_file() and not p.is_symlink() and p.name != KEEP
    }


def _restore_config(data_dir: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        path = data_dir / name
        path.write_bytes(content)
        _same_owner(path, data_dir)


def _same_owner(path: Path, like: Path) -> None:
    st = like.stat()
    if os.geteuid() == 0:
        os.chown(path, st.st_uid, st.st_gid)
