"""Failover onto the PostgreSQL kind's own warm standby, fed through the vault.

Both agents run as processes with a ``postgres`` stream and ``[failover]
enabled``: a ships its WAL into b's vault, b's sink rebuilds the WAL spool,
and the standby built by ``dragent standby init`` replays it through
``dragent wal-fetch``. Region a is killed whole (agent, PostgreSQL, S3, etcd
member) while a client writes to it; b's coordinator (inside its daemon)
takes the lease, waits for replay to settle, promotes the standby and moves
the DNS record. Ground truth: the client's log of acknowledged commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import tomli_w

from agent.agentproc import AgentProcess
from agent.coordination import fencing
from agent.lab import Lab
from agent.lab.bind import ADDRESSES, BindServer, resolve
from agent.lab.failover_drill import FAST, Writer, present_ids
from replicators.postgres.lsn import parse_lsn
from tests.support import eventually

pytestmark = pytest.mark.lab

WORK_ROOT = Path("/tmp/dragent-failover-tests")  # reachable by the postgres OS user


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rig:
    def __init__(self, lab: Lab, unique: str, dns: BindServer) -> None:
        self.lab, self.name, self.dns = lab, unique, dns
        WORK_ROOT.mkdir(exist_ok=True)
        WORK_ROOT.chmod(0o755)
        self.workdir = WORK_ROOT / unique
        self.workdir.mkdir()
        self.workdir.chmod(0o755)
        self.slot = "dragent_f" + unique.replace("-", "_")[-40:]
        self.port = free_port()
        self.replica = f"postgresql://dragent@127.0.0.1:{self.port}/app"
        self.primary = lab.pg_dsn("a")
        (self.workdir / "dsn-a").write_text(self.primary)
        (self.workdir / "dsn-b").write_text(self.replica)
        self.prefix = f"/dragent-pgfailover/{unique}"
        self.config = {r: self._config(r) for r in ("a", "b")}
        self.agents = {
            r: AgentProcess(
                self.config[r],
                self.workdir / f"{r}.log",
                self.workdir / f"{r}.pid",
                lab.agent_url(r),
            )
            for r in ("a", "b")
        }

    def _config(self, region: str) -> Path:
        lab = self.lab
        data = tomllib.loads(lab.config_path(region).read_text())
        data["data_dir"] = str(self.workdir / f"agent-{region}")
        postgres: dict[str, Any] = {
            "dsn": f"file:{self.workdir / f'dsn-{region}'}",
            "slot": self.slot,
        }
        if region == "b":
            postgres |= {
                "standby_data_dir": str(self.workdir / "standby"),
                "standby_port": self.port,
            }
        data["streams"] = [
            {
                "name": self.name,
                "kind": "postgres",
                "segment_max_age": "100ms",
                "postgres": postgres,
            }
        ]
        other = "b" if region == "a" else "a"
        # the other region's database first: `dragent failback` follows the first DSN
        probes = [self.replica if region == "a" else self.primary]
        probes.append(f"{lab.agent_url(other)}/healthz")
        data["etcd"] = {
            "endpoints": [f"http://127.0.0.1:{lab.port(region, 'etcd_client')}"],
            "prefix": self.prefix,
            "dial_timeout": 0.5,
        }
        pg = lab.postgres("a")
        data["failover"] = {
            **FAST,
            "enabled": True,
            "postgres_dsn": f"file:{self.workdir / f'dsn-{region}'}",
            "peer_probes": {other: probes},
            "switches": [self.dns.switch_config()],
            # the cluster `dragent failback` re-seeds in this region
            "postgres_data_dir": str(pg.data_dir if region == "a" else self.workdir / "standby"),
            "postgres_bin_dir": str(pg.bin_dir),
        }
        if os.geteuid() == 0:
            data["failover"]["postgres_os_user"] = "postgres"
        path = self.workdir / f"{region}.toml"
        path.write_text(tomli_w.dumps(data))
        return path

    async def cli(self, *args: str) -> str:
        code, out = await self.cli_status(*args)
        assert code == 0, out
        return out

    async def cli_status(self, *args: str) -> tuple[int, str]:
        """``dragent ARGS``: its exit code and its output (stdout and stderr)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        return int(proc.returncode or 0), out.decode()

    async def cleanup(self) -> None:
        for agent in self.agents.values():
            await agent.stop(grace=10)
        await self.lab.fault("a", "all", "start")
        pg_ctl = self.lab.postgres("a").command(
            "pg_ctl", "-D", str(self.workdir / "standby"), "-m", "immediate", "stop"
        )
        proc = await asyncio.create_subprocess_exec(
            *pg_ctl, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        await proc.wait()
        with contextlib.suppress(Exception):
            await fencing.unfence(self.primary)
        conn = await asyncpg.connect(self.primary)
        try:
            await conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = $1 AND NOT active",
                self.slot,
            )
        finally:
            await conn.close()
        for region in ("a", "b"):  # kept for a look after a failure
            with contextlib.suppress(OSError):
                shutil.copy(self.workdir / f"{region}.log", WORK_ROOT / f"last-{region}.log")
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest_asyncio.fixture(loop_scope="session")
async def rig(lab: Lab, unique: str, named: BindServer) -> AsyncIterator[Rig]:
    r = Rig(lab, unique, named)
    try:
        yield r
    finally:
        await r.cleanup()


async def test_region_a_killed_b_promotes_the_vault_fed_standby(rig: Rig) -> None:
    table = "f_" + rig.name.replace("-", "_")
    writer = Writer(rig.primary, table)
    await writer.setup()
    await rig.cli("backup", "postgres", "--config", str(rig.config["a"]))
    a, b = rig.agents["a"], rig.agents["b"]
    await a.start()
    await b.start()
    await a.wait_ready()
    await b.wait_ready()
    await rig.cli("standby", "init", "--config", str(rig.config["b"]))
    await resolve_to(rig, "a")

    async def b_follows_with_known_lag() -> bool:
        status = await b.status()
        failover = (status or {}).get("failover") or {}
        return (
            failover.get("lag_seconds") is not None
            and (await a.status() or {}).get("role") == "active"
        )

    await eventually(b_follows_with_known_lag, within=60)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(writer.run(stop))
        await eventually(lambda: len(writer.committed) > 50, within=20)
        await a.kill()
        await rig.lab.fault("a", "all", "kill")
        stop.set()

    async def b_serves() -> bool:
        status = await b.status()
        return bool(
            status
            and status["role"] == "active"
            and status["epoch"] == 2
            and status["failover"]["last_failover"]
        )

    await eventually(b_serves, within=60)
    record = (await b.status())["failover"]["last_failover"]  # type: ignore[index]
    assert not record["errors"], record
    assert record["notes"]["promoted"] is True
    # the last apply of the vault named an LSN, and the standby replayed up to it
    applied, replayed = record["notes"]["vault_applied_lsn"], record["notes"]["replayed_lsn"]
    assert applied and replayed and parse_lsn(replayed) >= parse_lsn(applied), record
    assert await resolve(rig.dns.port) == [ADDRESSES["b"]]
    present = await present_ids(rig.replica, table)
    kept = [t for i, t in writer.committed if i in present]
    lost = [t for i, t in writer.committed if i not in present]
    rpo = max(lost) - max(kept) if lost else 0.0
    assert rpo <= 1.0, (len(lost), record)
    assert record["rpo_seconds"] is not None and record["rpo_seconds"] <= 1.0
    assert record["rto_seconds"] < 60


async def resolve_to(rig: Rig, region: str) -> None:
    from agent.failover_config import Rfc2136Switch
    from agent.switch.rfc2136 import Rfc2136

    switch = Rfc2136(Rfc2136Switch(**rig.dns.switch_config()))
    await switch.point_to(region)
    await switch.forget_epoch()  # this rig's etcd prefix starts its epochs over
