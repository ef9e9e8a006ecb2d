"""The keeper fences a paused lease holder's database (a real SIGSTOP past the TTL).

Two agent processes on the lab, region a holding the lease with a keeper
process of its own (``dragent keeper``). Region a's agent is suspended
(SIGSTOP) for longer than the lease TTL: the keeper fences a's PostgreSQL
before the lease can expire, region b takes over, and when a's agent resumes
(SIGCONT) it finds it lost the lease, stays passive, and a's database still
refuses writes. Without the keeper, a's database took writes all along.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from agent.agentproc import AgentProcess
from agent.coordination import fencing
from agent.coordination.keeper import Watch, parse_pet
from agent.lab import Lab
from tests.support import eventually, takes_writes
from tests.test_failover_agent import config

pytestmark = pytest.mark.lab


def test_the_watch_fences_once_per_silence_and_never_while_disarmed() -> None:
    w = Watch()
    assert not w.due(100.0)
    w.pet(100.0, True, 2.0, 3)
    assert not w.due(101.9) and w.due(102.0)
    w.fenced(102.1)
    assert not w.due(103.0)  # done until the next armed pet
    w.pet(104.0, True, 1.0, 3)
    assert w.due(105.0)
    w.pet(105.0, False, 0.0, 4)
    assert not w.due(1e9)
    assert parse_pet(b'{"armed": true, "fence_in": 1.5, "epoch": 2}') == (True, 1.5, 2)
    for bad in (b"[]", b'{"armed": 1}', b'{"armed": true, "fence_in": -1}', b"{"):
        with pytest.raises(ValueError):
            parse_pet(bad)


async def test_a_paused_holder_is_fenced_by_its_keeper_before_the_lease_expires(
    lab: Lab, tmp_path: Path, unique: str
) -> None:
    prefix = f"/dragent-keeper/{unique}"
    sock = Path(tempfile.mkdtemp(prefix="dk-")) / "a.sock"  # short: a socket path <= 107
    paths = {r: config(lab, r, tmp_path, prefix) for r in ("a", "b")}
    data = tomllib.loads(paths["a"].read_text())
    data["failover"]["keeper_socket"] = str(sock)
    paths["a"].write_text(tomli_w.dumps(data))
    procs = {
        r: AgentProcess(p, tmp_path / f"{r}.log", tmp_path / f"{r}.pid", lab.agent_url(r))
        for r, p in paths.items()
    }
    keeper_log = (tmp_path / "keeper.log").open("ab")
    keeper = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "keeper", "--config", str(paths["a"]),
        stdout=keeper_log, stderr=keeper_log,
    )  # fmt: skip
    a, b = procs["a"], procs["b"]
    try:
        await a.start()
        await b.start()
        await a.wait_ready()

        async def a_active() -> bool:
            s = await a.status()
            return bool(s and s["role"] == "active" and s["failover"]["keeper"]["reached"])

        await eventually(a_active, within=30)
        assert await takes_writes(lab.pg_dsn("a"))
        assert a.proc is not None
        ttl = float(data["failover"]["lease_ttl"])
        paused_at = time.monotonic()
        a.proc.send_signal(signal.SIGSTOP)
        try:
            # fenced by the keeper within fence_after + fence_timeout, before the TTL

            async def read_only() -> bool:
                return not await takes_writes(lab.pg_dsn("a"))

            await eventually(read_only, within=ttl)
            assert time.monotonic() - paused_at < ttl

            async def b_took_over() -> bool:
                s = await b.status()
                return bool(s and s["role"] == "active" and s["epoch"] == 2)

            await eventually(b_took_over, within=30)
            assert not await takes_writes(lab.pg_dsn("a"))
        finally:
            a.proc.send_signal(signal.SIGCONT)

        async def a_knows() -> bool:
            s = await a.status()
            return bool(s and s["role"] == "passive" and s["failover"]["leader"] == "b")

        await eventually(a_knows, within=30)
        assert not await takes_writes(lab.pg_dsn("a"))
    finally:
        for p in procs.values():
            await p.stop(grace=10)
        keeper.terminate()
        await keeper.wait()
        keeper_log.close()
        await fencing.unfence(lab.pg_dsn("a"))
