"""A lab PostgreSQL cluster: initdb on first start, pg_ctl to start, configured for replication.

Layout under ``<region dir>/pg``: ``data/`` (the cluster; its ``postmaster.pid``
is the pid file), ``run/`` (the unix socket) and ``postgres.log``. The cluster
listens on its place's address (127.0.0.1, or the region's address in a
``netns`` lab, where every program runs inside the region's namespace) and
trusts every connection from ``clients`` (the lab's network), replication
included: it is a lab. Roles: ``postgres`` (bootstrap superuser) and ``dragent``
(superuser with REPLICATION); database ``app``.

PostgreSQL refuses to run as root, so when we are root every PostgreSQL
program runs as the ``postgres`` user through ``runuser`` and the cluster is
owned by that user. That user must also be able to reach the cluster, which a
lab under a private directory (pytest's ``/tmp/pytest-of-root`` is 0700 and
pytest resets it) does not allow; so as root the cluster lives under
``CLUSTERS_DIR`` and ``<region dir>/pg`` is a symlink to it. ``sweep_orphans()``
removes such clusters whose lab is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import tempfile
from pathlib import Path
from typing import ClassVar

import asyncpg

from agent.lab.network import LOOPBACK, Place
from agent.lab.processes import LabError, Server, read_pid
from replicators.postgres.pgtools import installed_bin_dir

KIND = "postgres"
OS_USER = "postgres"
DATABASE = "app"
ROLE = "dragent"
CONF_NAME = "dragent-lab.conf"
CLUSTERS_DIR = Path(tempfile.gettempdir()) / "dragent-lab-pg"
OWNER_FILE = "lab-link"

_SETTINGS = """\
listen_addresses = '{address}'
port = {port}
unix_socket_directories = '{socket_dir}'
max_connections = 50
shared_buffers = '32MB'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 20
# A stuck agent must not fill the primary's disk: its slot is invalidated past this.
max_slot_wal_keep_size = '1GB'
wal_keep_size = '64MB'
wal_log_hints = on
hot_standby = on
fsync = on
synchronous_commit = on
log_line_prefix = '%m [%p] %q%u@%d '
"""

_HBA = """\
# The lab trusts every local connection, replication included.
local   all          all                 trust
local   replication  all                 trust
host    all          all   {clients}  trust
host    replication  all   {clients}  trust
"""


def find_bin_dir() -> Path:
    """PostgreSQL's program directory: $DRAGENT_PG_BIN, else the newest /usr/lib/postgresql/*/bin,
    else wherever ``pg_ctl`` is on PATH."""
    if env := os.environ.get("DRAGENT_PG_BIN"):
        return Path(env)
    if found := installed_bin_dir():
        return found
    raise LabError("PostgreSQL programs not found", hint="install postgresql or set DRAGENT_PG_BIN")


def _run_as_owner() -> list[str]:
    return ["runuser", "-u", OS_USER, "--"] if os.geteuid() == 0 else []


def chown_for_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam(OS_USER)
        os.chown(path, user.pw_uid, user.pw_gid)


def _cluster_home(link: Path) -> Path:
    """Where the cluster of ``link`` (``<region dir>/pg``) lives: the link's target,
    else the directory itself when it exists or we are not root, else a new
    directory under ``CLUSTERS_DIR`` named by the link's path."""
    if link.is_symlink():
        return Path(os.readlink(link))
    if link.is_dir() or os.geteuid() != 0:
        return link
    return CLUSTERS_DIR / hashlib.sha256(str(link).encode()).hexdigest()[:16]


def sweep_orphans() -> None:
    """Delete the clusters under ``CLUSTERS_DIR`` whose lab link is gone and that do
    not run (left by labs deleted without ``down --purge``)."""
    with contextlib.suppress(FileNotFoundError):
        for home in CLUSTERS_DIR.iterdir():
            try:
                link = Path((home / OWNER_FILE).read_text().strip())
            except OSError:
                continue  # still being created, or not ours
            data = home / "data"
            if link.is_symlink() and Path(os.readlink(link)) == home:
                continue
            if read_pid(data / "postmaster.pid", str(data)) is None:
                shutil.rmtree(home, ignore_errors=True)


class PostgresServer(Server):
    """One region's PostgreSQL. ``start()`` runs initdb the first time."""

    kind: ClassVar[str] = KIND
    # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client to leave.
    stop_signal: ClassVar[int] = signal.SIGINT

    def __init__(
        self,
        where: str,
        region_dir: Path,
        port: int,
        bin_dir: Path | None = None,
        place: Place = LOOPBACK,
        clients: str = "127.0.0.1/32",
    ) -> None:
        self.link = region_dir / "pg"
        self.home = _cluster_home(self.link)
        self.data_dir = self.home / "data"
        self.socket_dir = self.home / "run"
        self.port = port
        self.bin_dir = bin_dir or find_bin_dir()
        self.clients = clients
        super().__init__(
            where,
            pid_file=self.data_dir / "postmaster.pid",
            log_file=self.home / "postgres.log",
            marker=str(self.data_dir),
            ports=[port],
            place=place,
        )

    def dsn(self, database: str = DATABASE, user: str = ROLE) -> str:
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    @property
    def endpoint(self) -> str:
        return self.dsn()

    def command(self, program: str, *args: str) -> list[str]:
        """The argv running one of PostgreSQL's programs as the cluster's owner, in
        the cluster's namespace."""
        return self.place.wrap([*_run_as_owner(), str(self.bin_dir / program), *args])

    async def start(self) -> None:
        """Create the cluster if it does not exist, write its config, start it; return
        without waiting for readiness (see ``wait_ready``). Idempotent."""
        if self.is_running():
            return
        if not (self.data_dir / "PG_VERSION").exists():
            await self._initdb()
        self._write_config()
        await self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-W", "start")

    async def probe(self) -> bool:
        try:
            async with asyncio.timeout(2.0):
                conn = await asyncpg.connect(
                    host=self.host, port=self.port, user=OS_USER, database="postgres"
                )
                try:
                    await conn.fetchval("SELECT 1")
                finally:
                    await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        return True

    async def wait_ready(self) -> None:
        """Wait until the cluster accepts queries, then create role and database if missing."""
        await super().wait_ready()
        try:
            async with asyncio.timeout(10.0):
                await self._bootstrap()
        except TimeoutError:
            raise self.failure("did not create its role and database within 10s") from None

    async def _bootstrap(self) -> None:
        conn = await asyncpg.connect(host=self.host, port=self.port, user=OS_USER)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", ROLE):
                await conn.execute(f"CREATE ROLE {ROLE} LOGIN SUPERUSER REPLICATION")
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE):
                await conn.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
        finally:
            await conn.close()

    async def _initdb(self) -> None:
        if self.home != self.link:
            # The link first: a cluster with an owner file but no link is an orphan.
            self.link.parent.mkdir(parents=True, exist_ok=True)
            self.link.unlink(missing_ok=True)
            self.link.symlink_to(self.home)
            self.home.mkdir(parents=True, exist_ok=True)
            (self.home / OWNER_FILE).write_text(f"{self.link}\n")
        self.home.mkdir(parents=True, exist_ok=True)
        chown_for_postgres(self.home)
        self.home.chmod(0o700)
        args = ["-D", str(self.data_dir), "-U", OS_USER, "-A", "trust", "-E", "UTF8"]
        await self._run("initdb", *args, "--no-locale", "--no-sync", "--no-instructions")

    def _write_config(self) -> None:
        self.socket_dir.mkdir(exist_ok=True)
        chown_for_postgres(self.socket_dir)
        # A unix socket path is limited to 107 bytes; too deep a lab gets TCP only.
        too_long = len(str(self.socket_dir / f".s.PGSQL.{self.port}")) > 100
        settings = _SETTINGS.format(
            address=self.host, port=self.port, socket_dir="" if too_long else self.socket_dir
        )
        conf = self.data_dir / CONF_NAME
        conf.write_text(settings)
        (self.data_dir / "pg_hba.conf").write_text(_HBA.format(clients=self.clients))
        main = self.data_dir / "postgresql.conf"
        include = f"include_if_exists = '{CONF_NAME}'\n"
        if include not in main.read_text():
            with main.open("a") as f:
                f.write(include)
        for path in (conf, self.data_dir / "pg_hba.conf"):
            path.chmod(0o600)
            chown_for_postgres(path)

    def remove(self) -> None:
        """Delete the cluster and its link (the server must be stopped)."""
        shutil.rmtree(self.home, ignore_errors=True)
        if self.link.is_symlink():
            self.link.unlink()

    async def _run(self, program: str, *args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self.command(program, *args),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=self.home,
        )
        out, _ = await proc.communicate()
        if proc.returncode:
            tail = "\n".join("    " + s for s in out.decode(errors="replace").splitlines()[-15:])
            raise LabError(f"{program} failed for {self.name} (exit {proc.returncode}):\n{tail}")
