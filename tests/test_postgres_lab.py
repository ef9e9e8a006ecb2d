"""The postgres kind end to end on the lab's real PostgreSQL and SeaweedFS.

Region a's primary streams WAL through a slot into region b's vault (shipper
in-process); a base backup goes to the same vault; region b's sink rebuilds the
WAL spool; a standby built from the vault follows the primary; point-in-time
restores come back with exactly the rows they should.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import random
import shutil
import socket
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from agent.agentproc import AgentProcess
from agent.config import AgentConfig, StreamConfig, load_config
from agent.lab import Lab
from agent.supervise import StreamTask, run_stream
from replicators.keys import KeyProvider, build_key_provider
from replicators.metrics import Metrics
from replicators.postgres import lsn as L
from replicators.postgres import standby, walfetch
from replicators.postgres.basebackup import take_backup
from replicators.postgres.gaps import GapBook
from replicators.postgres.guard import SyncGuard
from replicators.postgres.kind import verify as kind_verify
from replicators.postgres.options import PostgresOptions
from replicators.postgres.restore import RestoreTarget, restore
from replicators.postgres.spool import WalSpool
from replicators.postgres.walfetch import fetch
from replicators.postgres.walsource import WalSource
from replicators.progress import StreamProgress
from replicators.s3 import S3Store
from replicators.settings import Secret
from replicators.shipper import Shipper, ShipperSettings
from replicators.sink import Sink, SinkSettings
from replicators.vault import SegmentRef, Vault
from tests.support import eventually
from verifiers.postgres import compare
from verifiers.report import check, sign

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

    @property
    def spool(self) -> Path:
        """The WAL spool, under a directory whose name a shell would split and a
        postgresql.conf string would end (a space and a quote)."""
        return self.workdir / "the spool's home" / "spool"

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
            WalSpool(self.spool),
            StreamProgress(name, "postgres", "sink", "vault"),
            self.metrics.stream(name, "vault"),
        )


@pytest_asyncio.fixture(loop_scope="session")
async def pg(lab: Lab, cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str) -> AsyncIterator[PgRig]:
    await lab.up()  # idempotent: restarts whatever an earlier test left stopped
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
            await conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
            await conn.execute("SELECT pg_reload_conf()")
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
        try:
            await runner.recover()
            while not stop.is_set():
                if not await runner.sync_once(stop):
                    await asyncio.sleep(idle)
        finally:
            await (runner.source if isinstance(runner, Shipper) else runner.target).aclose()

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
            spool=pg.spool,
        )
        replica = f"postgresql://dragent@127.0.0.1:{port}/app"
        # the standby runs a copy of wal-fetch beside its spool, never the checkout's
        auto = (data_dir / "postgresql.auto.conf").read_text()
        assert os.path.dirname(walfetch.__file__) not in auto
        assert "spool.fetch/walfetch.py" in auto
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
        # the spool is shared with the database's user only: WAL is never world-readable
        postgres_gid = pwd.getpwnam("postgres").pw_gid
        for path in [pg.spool, *pg.spool.iterdir()]:
            st = path.stat()
            assert st.st_gid == postgres_gid and not st.st_mode & 0o007, (path, oct(st.st_mode))
        # the live standby, compared at the primary's LSN while writes go on
        writes = asyncio.create_task(insert_range(primary, table, 1000, 1100))
        report = await compare(primary, replica, [f"public.{table}"])
        await writes
        assert report["ok"] and report["at"]["copy_is_standby"] is True


def table_of(pg: PgRig) -> str:
    return "t_" + pg.stream.name.replace("-", "_")


async def insert_range(dsn: str, table: str, lo: int, hi: int) -> None:
    await execute(dsn, f"INSERT INTO {table} SELECT g, 'x' FROM generate_series({lo}, {hi - 1}) g")


async def current_lsn(dsn: str) -> int:
    return L.parse_lsn(str(await fetchval(dsn, "SELECT pg_current_wal_insert_lsn()::text")))


async def test_restore_to_a_time_holds_exactly_the_rows_committed_before(pg: PgRig) -> None:
    table, primary = table_of(pg), pg.lab.pg_dsn("a")
    await execute(primary, f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    shipper = pg.shipper()
    async with running(shipper):
        await take_backup(pg.options, pg.stream.name, pg.store, pg.send_keys)
        await insert_range(primary, table, 0, 100)
        await asyncio.sleep(1.0)
        point = time.time()
        await asyncio.sleep(1.0)
        await insert_range(primary, table, 100, 200)
        end = await current_lsn(primary)
        await eventually(lambda: shipper.end >= end, within=20)
    data_dir = pg.workdir / "restored"
    pg.clusters.append(data_dir)
    port = free_port()
    # a point the WAL never reaches fails within its deadline and leaves nothing behind
    beyond = RestoreTarget(lsn=end + (1 << 32))
    with pytest.raises(Exception):  # noqa: B017 - whatever the failure, cleanup follows
        await restore(
            pg.options, pg.stream.name, pg.store, pg.recv_keys,
            target=beyond, data_dir=data_dir, port=port, within=5.0,
        )  # fmt: skip
    assert not any(data_dir.iterdir()) and not data_dir.with_name("restored.wal").exists()
    result = await restore(
        pg.options, pg.stream.name, pg.store, pg.recv_keys,
        target=RestoreTarget(time=point), data_dir=data_dir, port=port,
    )  # fmt: skip
    restored = f"postgresql://dragent@127.0.0.1:{port}/app"
    assert await fetchval(restored, f"SELECT count(*) FROM {table}") == 100
    assert await fetchval(restored, f"SELECT max(id) FROM {table}") == 99
    assert result.replay_time is not None and result.replay_time <= point


async def test_corrupted_segment_is_refused_and_nothing_of_it_served(
    pg: PgRig, capsys: pytest.CaptureFixture[str]
) -> None:
    table, primary = table_of(pg), pg.lab.pg_dsn("a")
    await execute(primary, f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    shipper = pg.shipper()
    async with running(shipper):
        for i in range(4):
            await insert_range(primary, table, i * 10, i * 10 + 10)
            await asyncio.sleep(0.3)
        end = await current_lsn(primary)
        await eventually(lambda: shipper.end >= end, within=20)
    refs = [r async for r in pg.vault.segments(pg.stream.name)]
    assert len(refs) >= 3
    bad = refs[-1]
    blob = bytearray(await pg.store.get(bad.key))
    blob[len(blob) * 3 // 4] ^= 0x01  # inside the sealed frames
    await pg.store.put(bad.key, bytes(blob))  # overwrite: the vault's copy is now corrupt
    sink = pg.sink()
    task = StreamTask("vault->pg", sink, sink.progress, idle=0.1)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(run_stream(task, stop, pg.metrics))
        await eventually(lambda: task.state == "halted", within=20)
        stop.set()
    spool = pg.spool
    applied = await sink.target.state()
    assert applied is not None and applied.ref == SegmentRef(bad.epoch, bad.seq - 1, bad.stream)
    rejected = pg.metrics.segments.labels(pg.stream.name, "vault", "rejected")._value.get()
    assert rejected == 1
    captured = capsys.readouterr()
    assert "halted on integrity error" in captured.out + captured.err
    # wal-fetch serves nothing past what was applied before the corrupt segment
    name = L.wal_file_name(1, applied.end)
    out = pg.workdir / "fetched"
    if fetch(spool, name, out) == 0:
        data = out.read_bytes()
        assert data[applied.end % L.WAL_SEGMENT_SIZE :] == bytes(
            L.WAL_SEGMENT_SIZE - applied.end % L.WAL_SEGMENT_SIZE
        )


def agent_config(pg: PgRig, region: str, dsn_file: Path, **options: object) -> Path:
    data = tomllib.loads(pg.lab.config_path(region).read_text())
    data["data_dir"] = str(pg.workdir / f"agent-{region}")
    postgres = {"dsn": f"file:{dsn_file}", "slot": pg.options.slot, **options}
    data["streams"] = [
        {"name": pg.stream.name, "kind": "postgres", "segment_max_age": "100ms",
         "postgres": postgres}
    ]  # fmt: skip
    path = pg.workdir / f"{region}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


async def cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    return out.decode()


@pytest.mark.parametrize("synchronous", [False, True], ids=["async", "sync"])
async def test_kill_9_of_primary_and_agent_then_restore_latest(
    pg: PgRig, synchronous: bool
) -> None:
    """Every transaction acknowledged at least 1 s before the kill is in the restored copy;
    with ``synchronous = true``, every acknowledged transaction."""
    table, primary = table_of(pg), pg.lab.pg_dsn("a")
    await execute(primary, f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    dsn_file = pg.workdir / "dsn"
    dsn_file.write_text(primary)
    sync = {"synchronous": True, "synchronous_fallback_after": "60s"} if synchronous else {}
    cfg_a = agent_config(pg, "a", dsn_file, **sync)
    cfg_b = agent_config(pg, "b", dsn_file)
    await cli("backup", "postgres", "--config", str(cfg_a))
    agent = AgentProcess(cfg_a, pg.workdir / "a.log", pg.workdir / "a.pid", pg.lab.agent_url("a"))
    acked: list[tuple[int, float]] = []
    writers = 16  # zero-loss mode pipelines segments: many commits in flight at once

    async def writer(w: int) -> None:
        conn = await asyncpg.connect(primary)
        i = w * 1_000_000  # writer w's ids, in the order it commits them
        # the primary is killed under it: any of asyncpg's ways of saying so ends the writer
        gone = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
        with contextlib.suppress(*gone):
            while True:
                await conn.execute(f"INSERT INTO {table} VALUES ($1, 'x')", i)
                acked.append((i, time.time()))
                i += 1
                await asyncio.sleep(0.002)

    await agent.start()
    try:
        await agent.wait_ready()
        if synchronous:
            names = "SELECT current_setting('synchronous_standby_names')"
            await eventually(
                lambda: _contains(fetchval(primary, names), str(pg.options.slot)), within=30
            )
        async with asyncio.TaskGroup() as tg:
            for w in range(writers):
                tg.create_task(writer(w))
            await asyncio.sleep(random.uniform(2.5, 4.0))
            killed_at = time.time()
            await asyncio.gather(agent.kill(), pg.lab.fault("a", "postgres", "kill"))
        data_dir = pg.workdir / "latest"
        pg.clusters.append(data_dir)
        port = free_port()
        out = await cli(
            "restore", "postgres", "--config", str(cfg_b), "--to", "latest",
            "--target-dir", str(data_dir), "--port", str(port),
        )  # fmt: skip
    finally:
        await agent.kill()
        await pg.lab.fault("a", "postgres", "start")  # the lab's primary serves the next test
    assert "at LSN" in out
    restored = f"postgresql://dragent@127.0.0.1:{port}/app"
    conn = await asyncpg.connect(restored)
    try:
        present = {r[0] for r in await conn.fetch(f"SELECT id FROM {table}")}
    finally:
        await conn.close()
    must = {i for i, t in acked if synchronous or t <= killed_at - 1.0}
    assert len(must) > (10 if synchronous else 100)  # a sync commit waits for the vault
    assert must <= present, f"missing {sorted(must - present)[:10]}"
    # in commit order: what the restored copy holds of each writer is a prefix of it
    for w in range(writers):
        mine = sorted(i for i in present if i // 1_000_000 == w)
        assert mine == list(range(w * 1_000_000, w * 1_000_000 + len(mine))), f"writer {w}"


async def _contains(value: Awaitable[object], part: str) -> bool:
    return part in str(await value)


async def test_synchronous_mode_falls_back_when_the_agent_stops_acknowledging(pg: PgRig) -> None:
    primary = pg.lab.pg_dsn("a")
    table = table_of(pg)
    await execute(primary, f"CREATE TABLE {table} (id int PRIMARY KEY)")
    options = pg.options.model_copy(update={"synchronous": True, "synchronous_fallback_after": 1.0})
    guard = SyncGuard(options, pg.stream.name, str(pg.options.slot))
    guard_stop = asyncio.Event()

    async def guard_loop() -> None:
        await guard.recover()
        while not guard_stop.is_set():
            await guard.sync_once(guard_stop)
            await asyncio.sleep(0.2)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(guard_loop())
        async with running(pg.shipper()):
            await eventually(lambda: guard.synchronous, within=20)
            await execute(primary, f"INSERT INTO {table} VALUES (1)")  # waits for the vault
        # the shipper is gone: a commit blocks until the guard falls back
        commit = asyncio.create_task(execute(primary, f"INSERT INTO {table} VALUES (2)"))
        await asyncio.sleep(0.5)
        assert not commit.done()
        async with asyncio.timeout(20):
            await commit
        assert guard.synchronous is False
        guard_stop.set()


async def test_verify_equal_roots_then_names_the_changed_key_range(pg: PgRig) -> None:
    table, primary = table_of(pg), pg.lab.pg_dsn("a")
    await execute(primary, f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    shipper = pg.shipper()
    async with running(shipper):
        await take_backup(pg.options, pg.stream.name, pg.store, pg.send_keys)
        await insert_range(primary, table, 0, 5000)
        end = await current_lsn(primary)
        await eventually(lambda: shipper.end >= end, within=20)
    data_dir = pg.workdir / "copy"
    pg.clusters.append(data_dir)
    port = free_port()
    await restore(
        pg.options, pg.stream.name, pg.store, pg.recv_keys,
        target=RestoreTarget(), data_dir=data_dir, port=port,
    )  # fmt: skip
    copy = f"postgresql://dragent@127.0.0.1:{port}/app"
    qualified = f"public.{table}"
    stream = pg.stream.model_copy(
        update={
            "postgres": pg.options.model_copy(
                update={"verify_dsn": Secret(copy, "test"), "verify_tables": [qualified]}
            )
        }
    )
    same = await kind_verify(stream, load_config(pg.lab.config_path("a")))
    assert same["ok"] and same["differences"] == [] and same["stream"] == pg.stream.name
    assert same["roots"]["primary"] == same["roots"]["copy"]
    assert same["tables"][qualified]["copy"]["rows"] == same["counts"]["copy"] == 5000
    await execute(copy, f"UPDATE {table} SET v = 'changed' WHERE id = 3210")
    report = await compare(primary, copy, [qualified])
    assert not report["ok"] and report["roots"]["primary"] != report["roots"]["copy"]
    [diff] = report["differences"]
    assert diff["lo"] <= 3210 <= diff["hi"] and diff["hi"] - diff["lo"] < 64
    assert report["range_queries"] < 100  # descended only into the differing ranges
    key = Ed25519PrivateKey.generate()
    signed = sign({**report, "stream": pg.stream.name, "region": "a"}, key)
    check(signed, key.public_key())


async def test_source_survives_a_primary_restart(pg: PgRig) -> None:
    """The supervising loop reconnects; the vault stays one contiguous WAL log."""
    table, primary = table_of(pg), pg.lab.pg_dsn("a")
    await execute(primary, f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    shipper = pg.shipper()
    task = StreamTask("pg->b", shipper, shipper.progress)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(run_stream(task, stop, pg.metrics))
        await insert_range(primary, table, 0, 100)
        await pg.lab.fault("a", "postgres", "restart")
        await insert_range(primary, table, 100, 200)
        end = await current_lsn(primary)
        await eventually(lambda: shipper.end >= end, within=60)
        assert pg.metrics.restarts.labels("pg->b", "SourceError")._value.get() >= 1
        stop.set()
    await shipper.source.aclose()
    sink = pg.sink()
    await sink.recover()
    await sink.sync_once(asyncio.Event())  # continuity checked segment by segment
    applied = await sink.target.state()
    assert applied is not None and applied.end == shipper.end


async def test_agents_and_standby_end_to_end_with_metrics(pg: PgRig) -> None:
    """Both agents as processes: a streams, b rebuilds the spool, the CLI-built standby
    follows, and both /metrics show the postgres gauges."""
    table, primary = table_of(pg), pg.lab.pg_dsn("a")
    await execute(primary, f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    port = free_port()
    replica = f"postgresql://dragent@127.0.0.1:{port}/app"
    (pg.workdir / "dsn-a").write_text(primary)
    (pg.workdir / "dsn-b").write_text(replica)
    cfg_a = agent_config(pg, "a", pg.workdir / "dsn-a")
    cfg_b = agent_config(
        pg, "b", pg.workdir / "dsn-b",
        standby_data_dir=str(pg.workdir / "standby"), standby_port=port,
    )  # fmt: skip
    await take_backup(pg.options, pg.stream.name, pg.store, pg.send_keys)
    agents = [
        AgentProcess(cfg, pg.workdir / f"{r}.log", pg.workdir / f"{r}.pid", pg.lab.agent_url(r))
        for r, cfg in (("a", cfg_a), ("b", cfg_b))
    ]
    try:
        for agent in agents:
            await agent.start()
            await agent.wait_ready()
        pg.clusters.append(pg.workdir / "standby")
        await cli("standby", "init", "--config", str(cfg_b))
        await insert_range(primary, table, 0, 300)

        async def followed() -> bool:
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                return await fetchval(replica, f"SELECT count(*) FROM {table}") == 300
            return False

        await eventually(followed, within=30)
        metrics_a = await _metrics(pg.lab.agent_url("a"))
        assert f'dragent_pg_slot_retained_bytes{{slot="{pg.options.slot}"' in metrics_a
        assert "dragent_rpo_seconds{" in metrics_a

        async def replay_metric() -> bool:
            return "dragent_pg_standby_replay_lag_bytes{" in await _metrics(pg.lab.agent_url("b"))

        await eventually(replay_metric, within=20)
    finally:
        for agent in agents:
            await agent.stop(grace=10)


async def _metrics(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        return await resp.text()


async def test_timeline_history_follows_a_promoted_primary(pg: PgRig) -> None:
    """A standby promoted to primary (timeline 2) streams its history file first; the
    spool serves it and names the new WAL files on timeline 2."""
    async with running(pg.shipper()):
        await take_backup(pg.options, pg.stream.name, pg.store, pg.send_keys)
    port = free_port()
    data_dir = pg.workdir / "promoted"
    pg.clusters.append(data_dir)
    await restore(
        pg.options, pg.stream.name, pg.store, pg.recv_keys,
        target=RestoreTarget(), data_dir=data_dir, port=port,
    )  # fmt: skip
    new_primary = f"postgresql://dragent@127.0.0.1:{port}/app"
    options = pg.options.model_copy(update={"dsn": Secret(new_primary, "test")})
    name = pg.stream.name + "-tl2"
    shipper = Shipper(
        ShipperSettings(name, "b", 1, 8 << 20, 0.1),
        WalSource(options, "b", name),
        pg.vault,
        pg.send_keys,
        pg.workdir / "tl2-shipped.json",
        StreamProgress(name, "postgres", "source", "b"),
        pg.metrics.stream(name, "b"),
    )
    async with running(shipper):
        await execute(new_primary, "CREATE TABLE after_promotion (id int PRIMARY KEY)")
        end = await current_lsn(new_primary)
        await eventually(lambda: shipper.end >= end, within=20)
    spool = WalSpool(pg.workdir / "tl2-spool")
    sink = Sink(
        SinkSettings(name, "a"), pg.vault, pg.recv_keys, spool,
        StreamProgress(name, "postgres", "sink", "vault"), pg.metrics.stream(name, "vault"),
    )  # fmt: skip
    await sink.recover()
    await sink.sync_once(asyncio.Event())
    # the lab's primary may already be past timeline 1 (earlier failover tests in the session)
    conn = await asyncpg.connect(new_primary)
    try:
        timeline = int(await conn.fetchval("SELECT timeline_id FROM pg_control_checkpoint()"))
    finally:
        await conn.close()
    assert timeline >= 2
    out = pg.workdir / "history"
    assert fetch(spool.directory, f"{timeline:08X}.history", out) == 0
    assert out.read_bytes().startswith(b"1\t")  # a history file lists every earlier timeline
    assert any(p.name.startswith(f"{timeline:08X}") for p in spool.directory.iterdir())
    await execute(new_primary, "SELECT pg_drop_replication_slot('" + str(pg.options.slot) + "')")


async def test_slot_retention_warns_and_an_invalidated_slot_is_reseeded_with_a_gap(
    pg: PgRig, capsys: pytest.CaptureFixture[str]
) -> None:
    primary = pg.lab.pg_dsn("a")
    options = pg.options.model_copy(update={"slot_warn_bytes": 1})
    source = WalSource(options, "b", pg.stream.name)
    await source.resume(0)
    shipped = source._received  # where a stream that shipped nothing more would resume
    await source.aclose()  # the slot stays, nobody streams: it retains WAL
    conn = await asyncpg.connect(primary)
    try:
        await conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '32MB'")
        await conn.execute("SELECT pg_reload_conf()")
        for _ in range(10):  # 160 MiB of WAL files past the slot (wal_keep_size is 64MB)
            await conn.execute("SELECT pg_logical_emit_message(false, 'fill', 'x')")
            await conn.execute("SELECT pg_switch_wal()")
        source = WalSource(options, "b", pg.stream.name)
        await source.resume(0)  # still valid: retained WAL reported and warned about
        await source._check_slot()
        assert source.retained_bytes > 32 << 20
        assert "slot retains too much WAL" in "".join(capsys.readouterr())
        await source.aclose()
        await conn.execute("CHECKPOINT")  # the checkpoint invalidates the slot
        lost = "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1"
        assert await conn.fetchval(lost, options.slot) == "lost"
        # re-seeded: the slot is created again and the log goes on after a gap record
        book = GapBook(pg.workdir / "gaps", pg.stream.name, "b")
        source = WalSource(options, "b", pg.stream.name, book)
        source.note_durable_time(1234.5)
        await source.resume(shipped)
        try:
            assert await conn.fetchval(lost, options.slot) in ("reserved", "extended")
            [gap] = book.gaps()
            assert (gap.start, gap.start_time, gap.covered_by) == (shipped, 1234.5, None)
            assert "invalidated" in gap.reason and gap.end > shipped
            batch = await source.next_batch(1 << 20, 0.1, asyncio.Event())
            assert (batch[0].start, batch[0].end) == (gap.start, gap.end)
            assert L.unpack_record(batch[0].payload)[1] == L.GAP
            assert source.unrestorable_since() == 1234.5
        finally:
            await source.aclose()
    finally:
        await conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        await conn.execute("SELECT pg_reload_conf()")
        await conn.close()


async def test_the_backup_job_seeds_a_vault_with_none_then_waits(
    pg: PgRig, cfg_a: AgentConfig
) -> None:
    """No base backup of the primary's timeline in the peer's vault (a new stream, or a
    role change): the active side's job takes one at once, then none until one is due."""
    from replicators.postgres.kind import BackupSchedule

    job = BackupSchedule(pg.stream, cfg_a.peers[0], GapBook(pg.workdir / "gaps", "x", "b"))
    await job.recover()
    assert job.newest is None
    assert await job.sync_once(asyncio.Event())
    await job.recover()
    assert job.newest is not None and job.newest.stream == pg.stream.name
    assert not await job.sync_once(asyncio.Event())


async def test_verify_finds_a_one_row_change_whatever_the_key(lab: Lab, unique: str) -> None:
    """Composite, text and uuid primary keys and a table without one are all compared (two
    databases of the lab's cluster as the two copies); a one-row change is found in each."""
    one, two = lab.pg_dsn("a"), lab.pg_dsn("a", database="postgres")
    base = "v_" + unique.replace("-", "_")[-30:]
    ddl = {
        f"{base}_comp": "(a int, b text, v text, PRIMARY KEY (a, b))",
        f"{base}_text": "(k text PRIMARY KEY, v text)",
        f"{base}_uuid": "(k uuid PRIMARY KEY, v text)",
        f"{base}_none": "(a int, v text)",
    }
    rows = {
        f"{base}_comp": "SELECT i % 50, 'b' || i, 'v' || i FROM generate_series(1, 3000) i",
        f"{base}_text": "SELECT 'key-' || i, 'v' || i FROM generate_series(1, 3000) i",
        f"{base}_uuid": "SELECT md5(i::text)::uuid, 'v' || i FROM generate_series(1, 3000) i",
        f"{base}_none": "SELECT i % 100, 'v' || (i % 7) FROM generate_series(1, 3000) i",
    }
    for dsn in (one, two):
        for table, columns in ddl.items():
            fill = f"INSERT INTO {table} {rows[table]}"
            await execute(dsn, f"CREATE TABLE {table} {columns}", fill)
    tables = [f"public.{t}" for t in ddl]
    try:
        same = await compare(one, two, tables)
        assert same["ok"] and same["skipped_tables"] == [], same["differences"]
        assert {same["tables"][t]["copy"]["rows"] for t in tables} == {3000}
        changes = {
            f"{base}_comp": "UPDATE {t} SET v = 'x' WHERE a = 7 AND b = 'b1007'",
            f"{base}_text": "UPDATE {t} SET v = 'x' WHERE k = 'key-42'",
            f"{base}_uuid": "UPDATE {t} SET v = 'x' WHERE k = md5('99')::uuid",
            f"{base}_none": "DELETE FROM {t} WHERE ctid = (SELECT min(ctid) FROM {t} WHERE a = 5)",
        }
        for table, change in changes.items():
            await execute(two, change.format(t=table))
        report = await compare(one, two, tables)
        found = {d["table"]: d for d in report["differences"]}
        assert set(found) == set(tables), report["differences"]
        kept, left = found[f"public.{base}_none"]["counts"]
        assert kept - left == 1  # the one row deleted from a table without a key
        assert report["tables"][f"public.{base}_comp"]["key"] == "hash of (a, b)"
    finally:
        for dsn in (one, two):
            await execute(dsn, *(f"DROP TABLE IF EXISTS {t}" for t in ddl))


async def test_an_idle_stream_ships_one_segment_per_heartbeat_and_its_rpo_stays_near_zero(
    pg: PgRig,
) -> None:
    """Idle, a stream ships only its heartbeats (``heartbeat_interval``, 5 s by default)
    and PostgreSQL's running-transactions record (at most every 15 s after any WAL); its
    RPO, proven from the primary's insert position, stays near zero meanwhile."""
    seconds, every = 30.0, 5.0  # the default heartbeat_interval: an idle stream's cost
    assert pg.options.heartbeat_interval == every
    shipper = pg.shipper()
    task = StreamTask("pg->b", shipper, shipper.progress)
    stop = asyncio.Event()
    rpos: list[float] = []
    async with asyncio.TaskGroup() as tg:
        tg.create_task(run_stream(task, stop, pg.metrics))
        await eventually(lambda: shipper.last is not None, within=30)
        await asyncio.sleep(3.0)  # what the start wrote is shipped
        assert shipper.last is not None
        first = shipper.last.seq
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            rpos.append(shipper.progress.rpo(time.time()))
            await asyncio.sleep(0.25)
        shipped = shipper.last.seq - first
        stop.set()
    await shipper.source.aclose()
    allowed = seconds / every + seconds / 15 + 2
    assert shipped <= allowed, f"{shipped} segments in {seconds:g}s idle, allowed {allowed:g}"
    rpos.sort()
    assert rpos[len(rpos) // 2] < 0.3 and rpos[-1] < 1.5, rpos[-5:]
    print(f"\nidle {seconds:g}s: {shipped} segments; RPO median {rpos[len(rpos) // 2]:.3f}s")
