"""A failover drill on a lab: region b's standby, both coordinators, faults, a writer.

Used by the lab tests, ``benchmarks/failover.py`` and game days. Region b's
standby here is a streaming replica of region a's PostgreSQL
(``pg_basebackup -R``) on one of the lab's spare ports: the coordinator only
needs a standby it can watch replay and promote. Each drill uses its own etcd
prefix, so drills never see each other's lease or epoch.

Timing of a drill: lease 3 s, renewals every 0.5 s, fencing after 2 s, takeover
after the lease expired and 1 s of failed probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from agent.config import AgentConfig, parse_config
from agent.coordination import fencing
from agent.coordination.coordinator import Coordinator
from agent.lab import Lab
from agent.lab.bind import BindServer
from agent.lab.netns import Link
from agent.lab.postgres import OWNER_FILE, PostgresServer, _chown

FAST = {
    "automatic": True,
    "lease_ttl": 3.0,
    "renew_interval": 0.5,
    "fence_after": 2.0,
    "probe_interval": 0.5,
    "probe_timeout": 0.5,
    "takeover_after": 1.0,
    "lockout": 0.0,
    "max_lag": 5.0,
    "heartbeat_interval": 0.1,
    "catchup_timeout": 10.0,
}


def standby_server(lab: Lab, name: str, port: int) -> PostgresServer:
    return PostgresServer(f"b standby {name}", lab.region_dir("b") / f"standby-{name}", port)


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
    _chown(server.home)
    server.home.chmod(0o700)
    source = lab.postgres(primary)
    await _run(
        server.command(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
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


def region_config(
    lab: Lab,
    region: str,
    *,
    prefix: str,
    dsn: str,
    probes: dict[str, list[str]],
    switches: list[dict[str, Any]],
    data_dir: Path,
    **failover: Any,
) -> AgentConfig:
    """The lab's agent config of ``region`` with ``[etcd]`` (its own member only)
    and ``[failover]`` for a drill."""
    data = lab.agent_config(region)
    data["data_dir"] = str(data_dir)
    data["etcd"] = {
        "endpoints": [f"http://127.0.0.1:{lab.port(region, 'etcd_client')}"],
        "prefix": prefix,
        "dial_timeout": 0.5,
    }
    data["failover"] = {
        **FAST,
        **failover,
        "postgres_dsn": dsn,
        "peer_probes": probes,
        "switches": switches,
    }
    return parse_config(data, f"drill {region}")


@dataclass
class Writer:
    """A client of region a writing one row per ``every`` seconds; ``committed``
    holds (id, commit wall time) of every COMMIT acknowledged to it."""

    dsn: str
    table: str
    every: float = 0.02
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
        next_id = 1
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
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
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


class Drill:
    """Both regions' coordinators on one lab, a standby for b, a cuttable link b→a.

    ``async with Drill(...)`` builds everything and starts the coordinators;
    leaving it stops them, removes the standby and unfences region a."""

    def __init__(self, lab: Lab, name: str, workdir: Path, dns: BindServer | None = None) -> None:
        self.lab = lab
        self.name = name
        self.workdir = workdir
        self.dns = dns
        self.prefix = f"/dragent-drill/{name}"
        self.standby_port = lab.port("shared", "dns") + 2 + (os.getpid() % 30)
        self.link = Link(lab.port("a", "postgres"))
        self.standby: PostgresServer | None = None
        self.coordinators: dict[str, Coordinator] = {}
        self.stops: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def a_dsn(self) -> str:
        return self.lab.pg_dsn("a")

    @property
    def b_dsn(self) -> str:
        return f"postgresql://dragent@127.0.0.1:{self.standby_port}/app"

    async def __aenter__(self) -> Drill:
        await self.link.start()
        with contextlib.suppress(fencing.FencingError):
            await fencing.unfence(self.a_dsn)
        self.standby = await make_standby(self.lab, self.name[:20], self.standby_port)
        self.start("a")
        self.start("b")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for region in list(self.tasks):
            await self.stop(region)
        await self.link.aclose()
        if self.standby is not None:
            await self.standby.stop()
            self.standby.remove()
        with contextlib.suppress(fencing.FencingError):
            await fencing.unfence(self.a_dsn)

    def config(self, region: str, **failover: Any) -> AgentConfig:
        switches = [self.dns.switch_config()] if self.dns and region == "b" else []
        if region == "a":
            dsn, probes = self.a_dsn, {"b": [self.b_dsn]}
        else:
            dsn, probes = (
                self.b_dsn,
                {
                    "a": [
                        self.link.url(
                            self.a_dsn.replace(str(self.lab.port("a", "postgres")), "{port}")
                        )
                    ]
                },
            )
        data_dir = self.workdir / region
        data_dir.mkdir(parents=True, exist_ok=True)
        return region_config(
            self.lab,
            region,
            prefix=self.prefix,
            dsn=dsn,
            probes=probes,
            switches=switches,
            data_dir=data_dir,
            **failover,
        )

    def start(self, region: str, **failover: Any) -> Coordinator:
        coordinator = Coordinator(self.config(region, **failover))
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
