"""The coordinator inside ``dragent run``: two agent processes with ``[failover]
enabled``; the active agent is killed -9 and the passive one takes the lease,
bumps the epoch and rebuilds its streams as the shipping side."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import tomli_w

from agent.agentproc import AgentProcess
from agent.coordination import fencing
from agent.lab import Lab
from agent.lab.failover_drill import FAST, secret_file
from tests.support import eventually

pytestmark = pytest.mark.lab


def config(lab: Lab, region: str, workdir: Path, prefix: str) -> Path:
    other = "b" if region == "a" else "a"
    data = tomllib.loads(lab.config_path(region).read_text())
    data["data_dir"] = str(workdir / region)
    data["streams"] = [
        {
            "name": prefix.rsplit("/", 1)[-1],
            "kind": "synthetic",
            "segment_max_age": "100ms",
            "synthetic": {"rate": 100},
        }
    ]
    data["etcd"] = {
        "endpoints": [f"http://127.0.0.1:{lab.port(region, 'etcd_client')}"],
        "prefix": prefix,
        "dial_timeout": 0.5,
    }
    data["failover"] = {
        **FAST,
        "enabled": True,
        "peer_probes": {other: [f"{lab.agent_url(other)}/healthz"]},
    }
    if region == "a":
        data["failover"]["postgres_dsn"] = secret_file(workdir / "dsn-a", lab.pg_dsn("a"))
    path = workdir / f"{region}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


@pytest_asyncio.fixture(loop_scope="session")
async def agents(lab: Lab, tmp_path: Path, unique: str) -> AsyncIterator[dict[str, AgentProcess]]:
    prefix = f"/dragent-agent/{unique}"
    procs = {
        r: AgentProcess(
            config(lab, r, tmp_path, prefix),
            tmp_path / f"{r}.log",
            tmp_path / f"{r}.pid",
            lab.agent_url(r),
        )
        for r in ("a", "b")
    }
    try:
        yield procs
    finally:
        for p in procs.values():
            await p.stop(grace=10)
        await fencing.unfence(lab.pg_dsn("a"))


def failover(status: dict[str, Any] | None) -> dict[str, Any]:
    assert status is not None and status["failover"] is not None
    return status["failover"]


async def test_killed_active_agent_passive_takes_over_and_ships(
    agents: dict[str, AgentProcess],
) -> None:
    a, b = agents["a"], agents["b"]
    await a.start()
    await b.start()
    await a.wait_ready()
    await b.wait_ready()

    async def roles() -> tuple[str, int, str, int] | None:
        sa, sb = await a.status(), await b.status()
        if not sa or not sb:
            return None
        return sa["role"], sa["epoch"], sb["role"], sb["epoch"]

    async def steady() -> bool:  # the passive region shows the epoch it follows
        return await roles() == ("active", 1, "passive", 1)

    await eventually(steady, within=30)
    sa = await a.status()
    assert failover(sa)["holding_lease"] and any("->b" in s["task"] for s in sa["streams"])

    async def metrics_show_lease_and_peer() -> bool:
        async with aiohttp.ClientSession() as session, session.get(f"{a.url}/metrics") as r:
            metrics = await r.text()
        held = "dragent_failover_lease_held 1.0" in metrics
        return held and 'dragent_failover_peer_up{peer="b"} 1.0' in metrics

    await eventually(metrics_show_lease_and_peer, within=15)

    await a.kill()

    seen: dict[str, Any] = {}

    async def b_took_over() -> bool:
        sb = await b.status()
        if not sb or sb["role"] != "active" or sb["epoch"] != 2:
            return False
        seen.update(sb)  # kept: under load the next /status call may time out
        return any(s["task"].endswith("->a") for s in sb["streams"])

    await eventually(b_took_over, within=45)
    sb = seen
    record = failover(sb)["last_failover"]
    assert record["from"] == "a" and record["to"] == "b" and record["epoch"] == 2
    assert set(record["phases"]) >= {"detection", "promotion", "dns"}
