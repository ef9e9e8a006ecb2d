"""The postgres kind end to end on the lab's real PostgreSQL and SeaweedFS.

Region a's primary streams WAL through a slot into region b's vault (shipper
in-process); a base backup goes to the same vault; region b's sink rebuilds the
WAL spool; a standby built from the vault follows the primary; point-in-time
restores come back with exactly the rows they should.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from agent.config import AgentConfig, StreamConfig
from agent.configbase import Secret
from agent.lab import Lab
from replicators.keys import KeyProvider, build_key_provider
from replicators.metrics import Metrics
from replicators.postgres import standby
from replicators.postgres.basebackup import take_backup
from replicators.postgres.options import PostgresOptions
from replicators.postgres.spool import WalSpool
from replicators.postgres.walsource import WalSource
from replicators.progress import StreamProgress
from replicators.s3 import S3Store
from replicators.shipper import Shipper, ShipperSettings
from replicators.sink import Sink, SinkSettings
from replicators.vault import Vault
from tests.support import eventually

pytestmark = pytest.mark.lab

WORK_ROOT = Path("/tmp/dragent-pg-tests")  # reachable by the postgres OS user


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_workdir(name: str) -> Path:
    WORK_ROOT.mkdir(exist_ok=True)
    WORK_ROOT.chmod(0o755)
    workdir = WORK_ROOT / name
    workdir.mkdir()
    workdir.chmod(0o755)
    return workdir


@dataclass
class PgRig:
    lab: Lab
    stream: StreamConfig
    options: PostgresOptions
    store: S3Store
    send_keys: KeyProvider
    recv_keys: KeyProvider
    workdir: Path
    metrics: Metrics = field(default_factory=lambda: Metrics(CollectorRegistry()))
    clusters: list[Path] = field(default_factory=list)

    @property
    def vault(self) -> Vault:
        return Vault(self.store)

    def shipper(self) -> Shipper:
        name = self.stream.name
        return Shipper(
            ShipperSettings(name, "b", 1, 8 << 20, 0.1),
            WalSource(self.options, "b"),
            self.vault,
            self.send_keys,
            self.workdir / "shipped.json",
            StreamProgress(name, "postgres", "source", "b"),
            self.metrics.stream(name, "b"),
        )

    def sink(self) -> Sink:
        name = self.stream.name
        return Sink(
            SinkSettings(name, "a"),
            self.vault,
            self.recv_keys,
            WalSpool(self.workdir / "spool"),
            StreamProgress(name, "postgres", "sink", "vault"),
            self.metrics.stream(name, "vault"),
        )


@pytest_asyncio.fixture(loop_scope="session")
async def pg(lab: Lab, cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str) -> AsyncIterator[PgRig]:
    workdir = make_workdir(unique)
    slot = "dragent_t" + unique.replace("-", "_")[-40:]
    options = PostgresOptions(dsn=Secret(lab.pg_dsn("a"), "test"), slot=slot)
    stream = StreamConfig(name=unique, kind="postgres", postgres=options)
    store = await S3Store.open(cfg_a.peers[0].vault)
    send, recv = build_key_provider(cfg_a.peers[0].keys), build_key_provider(cfg_b.keys)
    rig = PgRig(lab, stream, options, store, send, recv, workdir)
    try:
        yield rig
    finally:
        for data_dir in rig.clusters:
            with contextlib.suppress(Exception):
                await standby.stop(options, data_dir)
        await send.aclose()
        await recv.aclose()
        await store.aclose()
        conn = await asyncpg.connect(lab.pg_dsn("a"))
        try:
            await conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = $1 AND NOT active",
                slot,
            )
        finally:
            await conn.close()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.asynccontextmanager
async def running(*runners: Shipper | Sink, idle: float = 0.1) -> AsyncIterator[asyncio.Event]:
    """Run each runner's recover + sync_once loop until the block ends (then drain)."""
    stop = asyncio.Event()

    async def loop(runner: Shipper | Sink) -> None:
        await runner.recover()
        while not stop.is_set():
            if not await runner.sync_once(stop):
                await asyncio.sleep(idle)

    async with asyncio.TaskGroup() as tg:
        for r in runners:
            tg.create_task(loop(r))
        try:
            yield stop
        finally:
            stop.set()


async def execute(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for s in statements:
            await conn.execute(s)
    finally:
        await conn.close()


async def fetchval(dsn: str, query: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def test_standby_follows_primary_through_the_vault(pg: PgRig) -> None:
    table = "t_" + pg.stream.name.replace("-", "_")
    primary = pg.lab.pg_dsn("a")
    await execute(primary, f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    async with running(pg.shipper(), pg.sink()):
        await take_backup(pg.options, pg.stream.name, pg.store, pg.send_keys)
        port = free_port()
        data_dir = pg.workdir / "standby"
        pg.clusters.append(data_dir)
        await standby.init_standby(
            pg.options,
            pg.stream.name,
            pg.store,
            pg.recv_keys,
            data_dir=data_dir,
            port=port,
            spool=pg.workdir / "spool",
        )
        replica = f"postgresql://dragent@127.0.0.1:{port}/app"
        for i in range(5):
            await execute(
                primary,
                f"INSERT INTO {table} SELECT g, 'x' FROM "
                f"generate_series({i * 100}, {i * 100 + 99}) g",
            )

        async def caught_up() -> bool:
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                return await fetchval(replica, f"SELECT count(*) FROM {table}") == 500
            return False

        await eventually(caught_up, within=30)
        assert await fetchval(replica, "SELECT pg_is_in_recovery()") is True
