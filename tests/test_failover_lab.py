"""Failover on the lab: real etcd (3 members), real PostgreSQL, real BIND.

Region b's standby is a streaming replica of region a made for each test
(``agent.lab.failover_drill``); each test has its own etcd prefix. The
scenarios with a cut link (a cut off from b and the witness; only the a–b
link cut) need each region in its own network namespace: they are in
``test_failover_netns.py``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
import tomli_w

from agent.coordination import fencing, switchover
from agent.lab import Lab
from agent.lab.bind import ADDRESSES, BindServer, resolve
from agent.lab.failover_drill import Drill, Writer, kill_trial, present_ids, region_data
from tests.support import eventually

pytestmark = pytest.mark.lab


@pytest_asyncio.fixture(loop_scope="session")
async def drill(lab: Lab, named: BindServer, unique: str, tmp_path: Path) -> AsyncIterator[Drill]:
    from agent.failover_config import Rfc2136Switch
    from agent.switch.rfc2136 import Rfc2136

    switch = Rfc2136(Rfc2136Switch(**named.switch_config()))
    await switch.point_to("a")
    await switch.forget_epoch()  # each drill's etcd prefix starts its epochs over
    async with Drill(lab, unique, tmp_path, dns=named) as d:
        await d.ready(30)
        yield d


async def _write_while(writer: Writer, stop: asyncio.Event) -> None:
    await writer.setup()
    await writer.run(stop)


async def test_lease_epoch_and_fencing_token(drill: Drill) -> None:
    a, b = drill.coordinators["a"], drill.coordinators["b"]
    assert (a.role, a.epoch, a.fenced) == ("active", 1, False)
    assert b.role == "passive" and b.fenced  # its database is a standby: read-only
    assert not await fencing.is_fenced(drill.a_dsn)
    # a second acquisition cannot happen while a holds the lease
    assert await b.lease.acquire(1) is None
    assert await b.lease.acquire(0) is None
    assert (await b.lease.view()).epoch == 1
    # readiness says what it found, for every check of either region
    for c in (a, b):
        await c._check_readiness()
        assert c.readiness and all(r["detail"] for r in c.readiness.values()), c.readiness
    assert a.readiness["etcd"]["detail"] == "leader a, epoch 1"


async def test_each_region_publishes_its_health_in_etcd(drill: Drill, lab: Lab) -> None:
    b = drill.coordinators["b"]

    async def published() -> bool:
        health = await b.lease.get_json("health/a")
        return bool(health and health.get("checks") and health["heartbeat"])

    await eventually(published, within=10)
    health = await b.lease.get_json("health/a")
    assert health is not None and time.time() - health["at"] < 10
    assert health["role"] == "active" and health["epoch"] == 1
    vault = next(c for c in health["checks"] if c["target"] == lab.s3_endpoint("a"))
    assert vault["ok"]
    assert health["peers"]["b"]["down"] is False


async def test_region_a_killed_whole_b_serves_dns_switched(drill: Drill, named: BindServer) -> None:
    trial = await kill_trial(drill)
    record = trial["record"]
    assert record["epoch"] == 2 and not record["errors"], record
    assert await resolve(named.port) == [ADDRESSES["b"]]
    assert set(record["phases"]) == {
        "detection",
        "fencing",
        "catch_up",
        "promotion",
        "dns",
        "serving",
    }
    assert trial["rto_client"] < 60 and record["rto_seconds"] < 60
    # RPO from the client's log of acknowledged commits, and from the heartbeats
    assert trial["rpo_client"] <= 1.0, trial
    assert record["rpo_seconds"] is not None and record["rpo_seconds"] <= 1.0
    assert list((drill.workdir / "b" / "failovers").glob("*-failover.json"))
    # and in region b's hash-chained evidence log
    from agent.evidence.log import EvidenceLog

    log = await EvidenceLog.open(drill.config("b"))
    try:
        kinds = [e.get("type") for e in await log.entries()]
    finally:
        await log.aclose()
    assert "failover.failover" in kinds


async def test_switchover_to_b_then_failback_to_a_loses_nothing(
    drill: Drill, lab: Lab, named: BindServer
) -> None:
    a, b = drill.coordinators["a"], drill.coordinators["b"]
    table = "switch_" + drill.name.replace("-", "_")
    # given a client writing to a
    on_a = Writer(drill.a_dsn, table)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_write_while(on_a, stop))
        await eventually(lambda: len(on_a.committed) > 20, within=10)
        # when switching over to b while it writes
        record = await switchover.run(drill.config("b"), old_dsn=drill.a_dsn, planned=True)
        await asyncio.sleep(0.3)
        stop.set()
    assert record["kind"] == "switchover" and record["epoch"] == 2 and not record["errors"]
    assert await resolve(named.port) == [ADDRESSES["b"]]
    from agent.cli_failover import _ha

    shown = (await _ha(drill.config("a"), "status", ""))["last_change"]
    assert shown is not None and (shown["kind"], shown["to"], shown["epoch"]) == (
        "switchover",
        "b",
        2,
    )
    await eventually(lambda: b.writable and a.role == "passive" and a.fenced, within=15)
    assert on_a.committed and set(dict(on_a.committed)) <= await present_ids(drill.b_dsn, table)

    # then the client writes to b, a is re-seeded as b's standby, and traffic moves back
    on_b = Writer(drill.b_dsn, table, first_id=1_000_000)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(on_b.run(stop))
        await eventually(lambda: len(on_b.committed) > 20, within=10)
        how = await _failback_command(drill, lab)  # as an operator would: the CLI
        back = await switchover.run(drill.config("a"), old_dsn=drill.b_dsn, planned=True)
        await asyncio.sleep(0.3)
        stop.set()
    assert how in ("rewind", "basebackup")
    assert back["epoch"] == 3 and not back["errors"]
    assert await resolve(named.port) == [ADDRESSES["a"]]
    await eventually(lambda: a.writable and b.role == "passive", within=15)
    everything = set(dict(on_a.committed)) | set(dict(on_b.committed))
    assert everything <= await present_ids(drill.a_dsn, table)


async def _failback_command(drill: Drill, lab: Lab) -> str:
    """``dragent failback --config a.toml``: the leader's DSN from etcd and a's probes,
    the cluster from ``[failover] postgres_*``; returns how it re-seeded."""
    pg = lab.postgres("a")
    owner = "postgres" if os.geteuid() == 0 else None
    data = region_data(
        lab, "a", prefix=drill.prefix, dsn=drill.a_dsn, probes={"b": [drill.b_dsn]},
        switches=[], data_dir=drill.workdir / "a-cli", postgres_data_dir=str(pg.data_dir),
        postgres_bin_dir=str(pg.bin_dir), postgres_os_user=owner,
    )  # fmt: skip
    path = drill.workdir / "a-failback.toml"
    path.write_text(tomli_w.dumps(data))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "failback", "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out = (await proc.communicate())[0].decode()
    assert proc.returncode == 0, out
    how = out.rsplit("(", 1)[-1].rstrip(")\n")
    assert f"a: re-seeded as a standby of the leader ({how})" in out, out
    return how


async def test_a_paused_holder_leaves_a_fence_it_did_not_set_until_resumed(drill: Drill) -> None:
    """What a switchover does between fencing the old primary and moving the lease: the
    holder keeps renewing, keeps its database fenced and keeps shipping (mode active)."""
    a = drill.coordinators["a"]
    await a.lease.set_paused(True, "switchover")
    try:
        await fencing.fence_read_only(drill.a_dsn)
        await asyncio.sleep(4 * float(drill.config("a").failover.renew_interval) + 1.0)
        assert await fencing.is_fenced(drill.a_dsn)
        assert a.holding and a.fenced and a.mode == "active", a.status()
    finally:
        await a.lease.set_paused(False)
    await eventually(lambda: not a.fenced, within=10)
    assert not await fencing.is_fenced(drill.a_dsn)


async def test_no_wal_stream_starts_from_a_standby(drill: Drill) -> None:
    """A region that holds the lease before its standby is promoted (a switchover hands it
    over, then promotes) must not create its slot yet: a slot made on the standby holds
    a timeline the promotion ends, and streaming from it fails for good."""
    from replicators.errors import SourceError
    from replicators.postgres.options import PostgresOptions
    from replicators.postgres.walsource import WalSource
    from replicators.settings import Secret

    slot = "dragent_standby_probe"
    options = PostgresOptions(dsn=Secret(drill.b_dsn, "test"), slot=slot)
    with pytest.raises(SourceError, match="standby"):
        await WalSource(options, "a", "s").resume(0)
    conn = await asyncpg.connect(drill.b_dsn)
    try:
        query = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1"
        assert await conn.fetchval(query, slot) == 0
    finally:
        await conn.close()
    b = drill.coordinators["b"]
    assert b._in_recovery and b.mode == "passive"
