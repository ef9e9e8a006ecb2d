"""Two agents as processes on the lab with a ``postgres`` stream, failover on, and region
b's warm standby fed from the vault (``dragent standby init``), as in production.

``VaultStandbyRig`` writes both regions' configurations under ``workdir`` (a
directory the PostgreSQL OS user can reach), names the slot and the standby's
port, runs ``dragent`` commands, and on ``cleanup`` stops everything it started
and leaves region a's cluster (the lab's) a writable primary again. The
failover tests, the lifecycle test and the failover benchmark use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import asyncpg
import tomli_w

from agent.agentproc import AgentProcess
from agent.coordination import fencing
from agent.coordination.takeover import promote
from agent.lab.failover_drill import FAST, Writer
from agent.lab.lab import Lab
from agent.lab.ports import free_port
from agent.lab.processes import poll


class VaultStandbyRig:
    def __init__(self, lab: Lab, name: str, dns: Any, workdir: Path, slot: str) -> None:
        self.lab, self.name, self.dns = lab, name, dns
        workdir.parent.mkdir(exist_ok=True)
        workdir.parent.chmod(0o755)
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir()
        workdir.chmod(0o755)
        self.workdir = workdir
        self.slot = slot
        self.port = free_port()
        self.replica = f"postgresql://dragent@127.0.0.1:{self.port}/app"
        self.primary = lab.pg_dsn("a")
        (self.workdir / "dsn-a").write_text(self.primary)
        (self.workdir / "dsn-b").write_text(self.replica)
        self.prefix = f"/dragent-vault-standby/{name}"
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
        postgres: dict[str, Any] = {"dsn": f"file:{self.workdir / f'dsn-{region}'}"}
        postgres["slot"] = self.slot
        if region == "b":
            postgres |= {"standby_data_dir": str(self.workdir / "standby")}
            postgres |= {"standby_port": self.port}
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

    async def start(self) -> None:
        """A base backup of a into b's vault, both agents running and ready, then b's
        standby built from the vault (``dragent standby init``)."""
        await self.cli("backup", "postgres", "--config", str(self.config["a"]))
        for agent in self.agents.values():
            await agent.start()
        for agent in self.agents.values():
            await agent.wait_ready()
        await self.cli("standby", "init", "--config", str(self.config["b"]))

    async def kill_region_a(self, writer: Writer, acknowledged: int = 50) -> float:
        """Once ``writer`` (running against a) has more than ``acknowledged`` commits, kill
        region a whole: its agent with SIGKILL, then every server of the region. Returns
        the wall time of the kill."""
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(writer.run(stop))

            async def enough() -> bool:
                return len(writer.committed) > acknowledged

            async with asyncio.timeout(60):
                await poll(enough, 0.05)
            killed_at = time.time()
            await self.agents["a"].kill()
            await self.lab.fault("a", "all", "kill")
            stop.set()
        return killed_at

    async def cli(self, *args: str) -> str:
        """``dragent ARGS``; its output. Raises ``RuntimeError`` on a non-zero exit."""
        code, out = await self.cli_status(*args)
        if code:
            raise RuntimeError(f"dragent {' '.join(args[:2])} exited {code}: {out[-800:]}")
        return out

    async def cli_status(self, *args: str) -> tuple[int, str]:
        """``dragent ARGS``: its exit code and its output (stdout and stderr)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        return int(proc.returncode or 0), out.decode()

    async def cleanup(self, keep_logs: Path | None = None) -> None:
        """Stop both agents and the standby, bring region a back whole and writable, drop
        the slot; the agents' logs are copied to ``keep_logs`` (a look after a failure)."""
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
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
            await promote(self.primary)
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
        if keep_logs is not None:
            for region in ("a", "b"):
                with contextlib.suppress(OSError):
                    shutil.copy(self.workdir / f"{region}.log", keep_logs / f"last-{region}.log")
        shutil.rmtree(self.workdir, ignore_errors=True)
