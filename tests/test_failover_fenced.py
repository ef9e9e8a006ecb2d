"""A fenced region ships nothing, and says so; a refused switchover puts things back.

Two agent processes with ``[failover] enabled`` on the lab (real etcd,
PostgreSQL, SeaweedFS). Region a's own etcd member is suspended (SIGSTOP) past
``fence_after``: a fences itself, its ``/status`` and ``/metrics`` say
``fenced``, and no segment reaches region b's vault until a holds the lease
again (it reclaims it once etcd answers, under the next epoch).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from agent.agentproc import AgentProcess
from agent.config import load_config
from agent.coordination import switchover
from agent.lab import Lab
from agent.lab.failover_drill import Drill
from replicators.s3 import S3Store
from replicators.vault import Vault
from tests.support import eventually, takes_writes
from tests.test_failover_agent import agents  # noqa: F401  (fixture)

pytestmark = pytest.mark.lab


async def vault_refs(lab: Lab, stream: str) -> list[tuple[int, int]]:
    store = await S3Store.open(load_config(lab.config_path("b")).vault)
    try:
        return [(r.epoch, r.seq) async for r in Vault(store).segments(stream)]
    finally:
        await store.aclose()


async def metrics(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as r:
        return await r.text()


async def test_a_fenced_holder_ships_nothing_and_says_fenced(
    lab: Lab,
    agents: dict[str, AgentProcess],  # noqa: F811
    unique: str,
) -> None:
    a, b = agents["a"], agents["b"]
    await a.start()
    await b.start()
    await a.wait_ready()
    stream = next(iter(load_config(a.config).streams)).name

    async def role(p: AgentProcess, want: str) -> bool:
        status = await p.status()
        return status is not None and status["role"] == want

    await eventually(lambda: role(a, "active"), within=30)
    await eventually(lambda: _grows(lab, stream), within=15)

    await lab.fault("a", "etcd", "pause")
    try:
        await eventually(lambda: role(a, "fenced"), within=15)
        status = await a.status()
        assert status is not None
        shipping = [s for s in status["streams"] if s["side"] == "source"]
        # every task stops while fenced: the stream's shipper, and the region's jobs
        assert [s["state"] for s in shipping] == ["fenced"]
        assert {s["state"] for s in status["streams"]} == {"fenced"}
        rpo = shipping[0]["rpo_seconds"]
        assert status["failover"]["fenced"] and status["failover"]["mode"] == "fenced"
        text = await metrics(a.url)
        assert 'dragent_role{role="fenced"} 1.0' in text
        assert "dragent_failover_fenced 1.0" in text
        before = await vault_refs(lab, stream)
        conn = await asyncpg.connect(lab.pg_dsn("a"))
        try:
            assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
        finally:
            await conn.close()
        await asyncio.sleep(3.0)
        assert await vault_refs(lab, stream) == before, "a fenced region shipped segments"
        later = await a.status()
        assert later is not None
        again = [s for s in later["streams"] if s["side"] == "source"]
        assert again[0]["rpo_seconds"] >= rpo + 2.5

        async def lease_expired() -> bool:  # etcd (b and the witness) let a's lease go
            status = await b.status()
            return status is not None and status["failover"]["leader"] is None

        await eventually(lease_expired, within=30)
        assert await vault_refs(lab, stream) == before, "a fenced region shipped segments"
    finally:
        await lab.fault("a", "etcd", "resume")
    # etcd answers again: a finds its lease gone, reclaims it under the next epoch, ships
    await eventually(lambda: role(a, "active"), within=30)
    status = await a.status()
    assert status is not None and status["epoch"] == 2
    await eventually(lambda: _grows(lab, stream, epoch=2), within=20)


async def _grows(lab: Lab, stream: str, epoch: int = 1) -> bool:
    return any(e == epoch for e, _ in await vault_refs(lab, stream))


async def test_a_refused_switchover_puts_the_old_primary_back(
    lab: Lab, unique: str, tmp_path: Path
) -> None:
    async with Drill(lab, unique, tmp_path) as drill:
        await drill.ready(30)
        a = drill.coordinators["a"]
        standby = await asyncpg.connect(drill.b_dsn)
        try:
            await standby.execute("SELECT pg_wal_replay_pause()")
            primary = await asyncpg.connect(drill.a_dsn)
            try:  # WAL the paused standby cannot have replayed
                await primary.execute("CREATE TABLE IF NOT EXISTS refused_before (id int)")
                await primary.execute("INSERT INTO refused_before VALUES (1)")
            finally:
                await primary.close()
            with pytest.raises(switchover.SwitchoverError, match="unfenced"):
                await switchover.run(
                    drill.config("b"), old_dsn=drill.a_dsn, planned=True, within=2.0
                )
        finally:
            await standby.execute("SELECT pg_wal_replay_resume()")
            await standby.close()

        await eventually(lambda: takes_writes(drill.a_dsn), within=5)
        await eventually(lambda: not a.fenced and a.writable, within=5)
        view = await a.lease.view()
        assert (view.leader, view.epoch) == ("a", 1)
