"""A failover drill on a lab: region b's standby, both coordinators, faults, a writer.

Used by the lab tests, ``benchmarks/failover.py`` and game days. Region b's
standby here is a streaming replica of region a's PostgreSQL
(``pg_basebackup -R``) on one of the lab's spare ports: the coordinator only
needs a standby it can watch replay and promote. Each drill uses its own etcd
prefix, so drills never see each other's lease or epoch.

Timing of a drill: lease 5 s, renewals every 0.5 s, fencing after 2 s (within 1 s,
so fenced by 4 s with etcd's 0.5 s deadline), takeover
after the lease expired and 1 s of failed probes.

``Drill`` runs both coordinators in the caller's process, so its faults are
the lab's process faults (kill, pause). A cut link needs each region's
traffic to leave from inside its own network namespace: that is
``agent.lab.agent_drill.AgentDrill`` on a ``netns`` lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import dns.exception

from agent.config import AgentConfig, parse_config
from agent.coordination import fencing
from agent.coordination.coordinator import Coordinator
from agent.coordination.takeover import promote
from agent.lab import Lab
from agent.lab.bind import BindServer
from agent.lab.postgres import OWNER_FILE, PostgresServer, chown_for_postgres
from agent.lab.processes import poll

FAST = {
    "automatic": True,
    "lease_ttl": 5.0,
    "renew_interval": 0.5,
    "fence_after": 2.0,
    "fence_timeout": 1.0,
    "probe_interval": 0.5,
    "probe_timeout": 0.5,
    "takeover_after": 1.0,
    "lockout": 0.0,
    "max_lag": 5.0,
    "heartbeat_interval": 0.1,
    "catchup_timeout": 10.0,
}


def standby_server(lab: Lab, name: str, port: int) -> PostgresServer:
    """Region b's drill standby ``name`` on ``port`` (in b's namespace in a netns lab)."""
    home = lab.region_dir("b") / f"standby-{name}"
    return lab.postgres_at("b", home, port, name=f"b standby {name}")


async def make_standby(lab: Lab, name: str, port: int, primary: str = "a") -> PostgresServer:
    """A streaming standby of ``primary``'s PostgreSQL on ``port``, started and ready."""
    server = standby_server(lab, name, port)
    await server.stop()
    server.remove()
    server.link.parent.mkdir(parents=True, exist_ok=True)
    server.home.mkdir(parents=True, exist_ok=True)
    if server.home != server.link:
        server.link.symlink_to(server.home)
        (server.home / OWNER_FILE).write_text(f"{server.link}\n")
    chown_for_postgres(server.home)
    server.home.chmod(0o700)
    source = lab.postgres(primary)
    await _run(
        server.command(
            "pg_basebackup",
            "-h",
            source.host,
            "-p",
            str(source.port),
            "-U",
            "dragent",
            "-D",
            str(server.data_dir),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
        )
    )
    await server.start()
    await server.wait_ready()
    return server


async def _run(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd="/"
    )
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{argv[2] if len(argv) > 2 else argv[0]}: {out.decode()[-500:]}")


def region_data(
    lab: Lab,
    region: str,
    *,
    prefix: str,
    dsn: str,
    probes: dict[str, list[str]],
    switches: list[dict[str, Any]],
    data_dir: Path,
    etcd: list[str] | None = None,
    **failover: Any,
) -> dict[str, Any]:
    """The lab's agent config of ``region`` (a dict) with ``[etcd]`` (``etcd``,
    default its own member only) and ``[failover]`` for a drill."""
    data = lab.agent_config(region)
    data["data_dir"] = str(data_dir)
    data["etcd"] = {
        "endpoints": etcd or [lab.etcd_endpoint(region)],
        "prefix": prefix,
        "dial_timeout": 0.5,
    }
    data["failover"] = {
        **FAST,
        **failover,
        "postgres_dsn": secret_file(data_dir / "postgres-dsn", dsn),
        "peer_probes": probes,
        "switches": switches,
    }
    return data


def secret_file(path: Path, value: str) -> str:
    """Write ``value`` to ``path`` (mode 0600) and return its reference ``file:<path>``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(value)
    return f"file:{path}"


def region_config(lab: Lab, region: str, **options: Any) -> AgentConfig:
    """``region_data`` parsed: what an in-process coordinator takes."""
    return parse_config(region_data(lab, region, **options), f"drill {region}")


@dataclass
class Writer:
    """A client of region a writing one row per ``every`` seconds; ``committed``
    holds (id, commit wall time) of every COMMIT acknowledged to it."""

    dsn: str
    table: str
    every: float = 0.02
    first_id: int = 1
    committed: list[tuple[int, float]] = field(default_factory=list)
    refused: list[tuple[float, str]] = field(default_factory=list)

    async def setup(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (id bigint PRIMARY KEY)")
        finally:
            await conn.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Write until ``stop``; reconnect after each failure."""
        next_id = self.first_id
        conn: asyncpg.Connection | None = None
        while not stop.is_set():
            try:
                if conn is None or conn.is_closed():
                    async with asyncio.timeout(1.0):
                        conn = await asyncpg.connect(self.dsn)
                async with asyncio.timeout(1.0):
                    await conn.execute(f"INSERT INTO {self.table} VALUES ($1)", next_id)
                self.committed.append((next_id, time.time()))
                next_id += 1
            except Exception as e:  # a client logs every refusal and reconnects
                self.refused.append((time.time(), type(e).__name__))
                if conn is not None:
                    conn.terminate()
                    conn = None
            await asyncio.sleep(self.every)
        if conn is not None:
            conn.terminate()

    def committed_after(self, at: float) -> list[int]:
        return [i for i, t in self.committed if t > at]


async def present_ids(dsn: str, table: str) -> set[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r[0] for r in await conn.fetch(f"SELECT id FROM {table}")}
    finally:
        await conn.close()


class DrillRig:
    """What both drills share: a lab, a standby of region a's PostgreSQL for region b,
    an etcd prefix of its own, and each region's failover options."""

    def __init__(
        self,
        lab: Lab,
        name: str,
        workdir: Path,
        dns: BindServer | None = None,
        failover: dict[str, Any] | None = None,
    ) -> None:
        self.lab = lab
        self.failover = failover or {}
        self.name = name
        self.workdir = workdir
        self.dns = dns
        self.prefix = f"/dragent-drill/{name}"
        self.standby_port = lab.port("shared", "dns") + 2 + (os.getpid() % 30)
        self.standby: PostgresServer | None = None

    @property
    def a_dsn(self) -> str:
        return self.lab.pg_dsn("a")

    @property
    def b_dsn(self) -> str:
        return f"postgresql://dragent@{self.lab.address('b')}:{self.standby_port}/app"

    def options(self, region: str) -> dict[str, Any]:
        """``region_data``'s keyword arguments for ``region`` (its database, its probes of
        the other region, the DNS switch, its data directory)."""
        if region == "a":
            dsn, probes = self.a_dsn, {"b": [self.b_dsn]}
        else:
            dsn, probes = self.b_dsn, {"a": [self.a_dsn]}
        switches = [self.dns.switch_config()] if self.dns else []
        data_dir = self.workdir / region
        data_dir.mkdir(parents=True, exist_ok=True)
        return {
            "prefix": self.prefix,
            "dsn": dsn,
            "probes": probes,
            "switches": switches,
            "data_dir": data_dir,
        }

    async def build_standby(self) -> None:
        with contextlib.suppress(fencing.FencingError):
            await fencing.unfence(self.a_dsn)
        self.standby = await make_standby(self.lab, self.name[:20], self.standby_port)

    async def remove_standby(self) -> None:
        """Remove b's standby; leave region a's cluster (the lab's) a writable primary."""
        if self.standby is not None:
            await self.standby.stop()
            self.standby.remove()
        with contextlib.suppress(Exception):
            await promote(self.a_dsn)
        with contextlib.suppress(fencing.FencingError):
            await fencing.unfence(self.a_dsn)


class Drill(DrillRig):
    """Both regions' coordinators in this process on one lab, a standby for b.

    ``async with Drill(...)`` builds everything and starts the coordinators;
    leaving it stops them, removes the standby and unfences region a."""

    def __init__(
        self,
        lab: Lab,
        name: str,
        workdir: Path,
        dns: BindServer | None = None,
        failover: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(lab, name, workdir, dns, failover)
        self.coordinators: dict[str, Coordinator] = {}
        self.stops: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def __aenter__(self) -> Drill:
        await self.build_standby()
        self.start("a")
        self.start("b")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for region in list(self.tasks):
            await self.stop(region)
        await self.remove_standby()

    async def ready(self, within: float = 30.0) -> None:
        """Wait until a holds the lease unfenced and b follows it, fenced, with a
        known lag."""
        a, b = self.coordinators["a"], self.coordinators["b"]

        def steady() -> bool:
            following = b.view is not None and b.view.leader == "a" and b.fenced
            return a.writable and following and b.lag is not None

        async with asyncio.timeout(within):
            await poll(_true(steady), 0.1)

    def config(self, region: str, **failover: Any) -> AgentConfig:
        return region_config(self.lab, region, **self.options(region), **failover)

    def start(self, region: str, **failover: Any) -> Coordinator:
        coordinator = Coordinator(self.config(region, **{**self.failover, **failover}))
        stop = asyncio.Event()
        self.coordinators[region] = coordinator
        self.stops[region] = stop
        self.tasks[region] = asyncio.create_task(coordinator.run(stop), name=f"coord-{region}")
        return coordinator

    async def stop(self, region: str) -> None:
        """Stop a coordinator gracefully (its lease is left to expire)."""
        self.stops[region].set()
        task = self.tasks.pop(region)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def kill(self, region: str) -> None:
        """Cancel a coordinator abruptly, like SIGKILL of its agent."""
        task = self.tasks.pop(region)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def _true(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def wrapped() -> bool:
        return check()

    return wrapped


async def kill_trial(drill: Drill, within: float = 60.0) -> dict[str, Any]:
    """Kill region a whole (its coordinator, PostgreSQL, S3 and etcd member) while a
    client writes to it; wait until b serves; restart region a's servers.

    Returns the failover record of b and the client's view: ``rto_client``
    (kill → DNS answers b and b's database took a write under the new epoch),
    ``rpo_client`` (acknowledged commits missing in b, as the time between the
    last acknowledged commit and the last one b has) and ``lost_rows``."""
    from agent.lab.bind import resolve

    b = drill.coordinators["b"]
    table = "killed_" + drill.name.replace("-", "_")
    writer = Writer(drill.a_dsn, table)
    stop = asyncio.Event()
    await writer.setup()
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(writer.run(stop))
            await poll(_true(lambda: len(writer.committed) >= 20), 0.05)
            killed_at = time.time()
            await drill.kill("a")
            await drill.lab.fault("a", "all", "kill")
            stop.set()
        async with asyncio.timeout(within):
            await poll(_true(lambda: b.writable and b.last_record is not None), 0.05)
            if drill.dns is not None:
                dns_server = drill.dns

                async def dns_says_b() -> bool:
                    # UDP: an answer lost or late (a busy loop) is asked again
                    try:
                        answer = await resolve(dns_server.port, address=dns_server.address)
                    except (OSError, dns.exception.DNSException):
                        return False
                    return answer == [dns_server.addresses["b"]]

                await poll(dns_says_b, 0.05)
        served_at = time.time()
    finally:
        await drill.lab.fault("a", "all", "start")
    present = await present_ids(drill.b_dsn, table)
    kept = [t for i, t in writer.committed if i in present]
    lost = [i for i, _ in writer.committed if i not in present]
    last_ack = writer.committed[-1][1]
    record = b.last_record or {}
    return {
        "record": record,
        "killed_at": killed_at,
        "rto_client": round(served_at - killed_at, 3),
        "rto_from_kill": round(record["timeline"].get("serving", served_at) - killed_at, 3),
        "rpo_client": round(max(0.0, last_ack - max(kept)) if lost and kept else 0.0, 3),
        "lost_rows": len(lost),
        "committed_rows": len(writer.committed),
    }
