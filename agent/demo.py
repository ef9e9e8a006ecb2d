"""``dragent demo``: the lab, both agents, pgbench on region a, region b's standby following.

Brings the lab up, writes demo configurations with two streams (``synthetic``
and ``pg``, the lab's PostgreSQL), takes a base backup of region a into
region b's vault, starts region a (active) and region b (passive), builds
b's warm standby from the vault (``dragent standby init``), runs pgbench at a
fixed rate on a, and prints one line a second: the RPO of each stream at a,
and pgbench's history rows on a's primary next to b's standby. After the
given time or Ctrl-C it drains both agents, verifies b's vault, prints a
summary and stops everything (``--keep`` leaves the lab running).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import asyncpg
import tomli_w

from agent.agentproc import AgentProcess
from agent.config import load_config
from agent.demo_workload import count_objects, put_objects, tree_digest, write_model
from agent.lab import Lab
from agent.lab.seaweed import find_weed
from agent.vaultcmd import vault_verify
from replicators.settings import S3Config

PG_STREAM = "pg"
OBJECTS_STREAM = "objects"
OBJECTS_PREFIX = "objects/"
MODELS_STREAM = "models"
MODEL = "demo-llm"
PGBENCH_RATE = 50  # transactions per second on region a


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _stream(status: dict[str, Any] | None, name: str) -> dict[str, Any]:
    for s in (status or {}).get("streams") or []:
        if s.get("stream") == name and s.get("side") in ("source", "sink"):
            return s
    return {}


class Demo:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.dir = lab.root / "demo"
        self.pg_home = Path(lab.postgres("b").home)
        self.standby_port = _free_port()
        self.standby_dsn = f"postgresql://dragent@127.0.0.1:{self.standby_port}/app"
        self.agents: dict[str, AgentProcess] = {}

    def write_configs(self) -> dict[str, Path]:
        """Each region's lab config plus a ``pg`` stream over the lab's PostgreSQL."""
        self.dir.mkdir(parents=True, exist_ok=True)
        dsn = {"a": self.lab.pg_dsn("a"), "b": self.standby_dsn}
        paths = {}
        for region in ("a", "b"):
            data = tomllib.loads(self.lab.config_path(region).read_text())
            (self.dir / f"dsn-{region}").write_text(dsn[region])
            pg: dict[str, Any] = {"dsn": f"file:{self.dir / f'dsn-{region}'}"}
            if region == "b":
                pg |= {
                    "standby_data_dir": str(self.pg_home / "demo-standby"),
                    "standby_port": self.standby_port,
                    "spool_dir": str(self.pg_home / "demo-spool"),
                }
            data["streams"] = [
                *data["streams"],
                {"name": PG_STREAM, "kind": "postgres", "segment_max_age": "200ms", "postgres": pg},
                self._objects_stream(),
                {
                    "name": MODELS_STREAM,
                    "kind": "artifacts",
                    "segment_max_age": "200ms",
                    "artifacts": {
                        "root": str(self.lab.root / region / "models"),
                        "marker": "_COMPLETE",
                        "scan_interval": "2s",
                    },
                },
            ]
            paths[region] = self.dir / f"{region}.toml"
            paths[region].write_text(tomli_w.dumps(data))
        return paths

    def bucket(self, region: str) -> S3Config:
        opts = load_config(self.dir / f"{region}.toml").stream(OBJECTS_STREAM).objects
        assert opts is not None
        return opts.source if region == "a" else opts.mirror

    async def first_wave(self) -> None:
        """Model version 1 and 50 objects in region a."""
        await asyncio.to_thread(write_model, self.lab.root / "a" / "models", MODEL, "1")
        await put_objects(self.bucket("a"), 0, 50)
        print(f"region a: wrote {MODEL} version 1 and 50 objects")

    async def second_wave(self) -> None:
        """Version 2 with 10% of its tensors changed, and 50 more objects."""
        root = self.lab.root / "a" / "models"
        await asyncio.to_thread(write_model, root, MODEL, "2", "1")
        await put_objects(self.bucket("a"), 50, 50)
        print(f"region a: wrote {MODEL} version 2 (10% of tensors changed) and 50 more objects")

    def _objects_stream(self) -> dict[str, Any]:
        """Region a's ``data`` bucket under ``objects/``, mirrored into region b's."""
        vault = {r: tomllib.loads(self.lab.config_path(r).read_text())["vault"] for r in "ab"}
        bucket = {r: {**vault[r], "bucket": "data", "prefix": OBJECTS_PREFIX} for r in "ab"}
        filer = {
            r: {
                "filer": f"127.0.0.1:{self.lab.port(r, 'filer')}.{self.lab.port(r, 'filer_grpc')}",
                "weed": str(find_weed()),
            }
            for r in "ab"
        }
        return {
            "name": OBJECTS_STREAM,
            "kind": "objects",
            "segment_max_age": "200ms",
            "objects": {
                "source": bucket["a"],
                "mirror": bucket["b"],
                "source_region": "a",  # after a takeover, b ships its bucket back to a
                "events": "filer",
                "filer": filer["a"],
                "mirror_filer": filer["b"],
                "scan_interval": "30s",
            },
        }

    async def dragent(self, *args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"dragent {' '.join(args)} failed:\n{out.decode(errors='replace')}")

    async def pgbench(self, *args: str) -> asyncio.subprocess.Process:
        argv = self.lab.postgres("a").command("pgbench", *args, self.lab.pg_dsn("a"))
        return await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )

    async def history_rows(self, dsn: str) -> int | None:
        with contextlib.suppress(OSError, asyncpg.PostgresError, TimeoutError):
            conn = await asyncpg.connect(dsn, timeout=2)
            try:
                return int(await conn.fetchval("SELECT count(*) FROM pgbench_history"))
            finally:
                await conn.close()
        return None

    async def teardown_pg(self) -> None:
        standby = self.pg_home / "demo-standby"
        if (standby / "postmaster.pid").exists():
            stop = self.lab.postgres("b").command(
                "pg_ctl", "-D", str(standby), "-m", "fast", "stop"
            )
            proc = await asyncio.create_subprocess_exec(*stop, stdout=asyncio.subprocess.DEVNULL)
            await proc.wait()
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            conn = await asyncpg.connect(self.lab.pg_dsn("a"), timeout=5)
            try:
                await conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE slot_name = 'dragent_b' AND NOT active"
                )
            finally:
                await conn.close()


def _versions(root: Path) -> int:
    model = root / MODEL
    return len([v for v in model.iterdir() if v.is_dir()]) if model.is_dir() else 0


async def _line(demo: Demo, elapsed: float, samples: dict[str, list[float]]) -> None:
    rows_a = await demo.history_rows(demo.lab.pg_dsn("a"))
    rows_b = await demo.history_rows(demo.standby_dsn)
    objects_b = await count_objects(demo.bucket("b"))
    last = {k: (v[-1] if v else float("nan")) for k, v in samples.items()}
    print(
        f"{elapsed:5.1f}  {last['synthetic']:9.3f} {last[PG_STREAM]:7.3f} "
        f"{last[OBJECTS_STREAM]:7.3f}   {rows_a if rows_a is not None else '-':>7} "
        f"{rows_b if rows_b is not None else '-':>7}   {objects_b:>7}   "
        f"{_versions(demo.lab.root / 'b' / 'models'):>6}",
        flush=True,
    )


async def _watch(demo: Demo, seconds: float, stop: asyncio.Event) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"synthetic": [], PG_STREAM: [], OBJECTS_STREAM: []}
    started = time.monotonic()
    next_line, halfway = started, False
    print(f"{'':5}  {'RPO at region a (s)':^25}   {'pgbench rows':^15}   {'region b':^16}")
    print(
        f"{'t':>5}  {'synthetic':>9} {'pg':>7} {'objects':>7}   {'a':>7} {'standby':>7}   "
        f"{'objects':>7}   {'models':>6}"
    )
    while not stop.is_set() and time.monotonic() - started < seconds:
        if not halfway and time.monotonic() - started > seconds / 2:
            halfway = True
            await demo.second_wave()
        status = await demo.agents["a"].status()
        for name, values in samples.items():
            rpo = _stream(status, name).get("rpo_seconds")
            if rpo is not None:
                values.append(float(rpo))
        if time.monotonic() >= next_line:
            next_line += 1.0
            await _line(demo, time.monotonic() - started, samples)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.25):
                await stop.wait()
    return samples


async def _start(demo: Demo, configs: dict[str, Path]) -> None:
    print("pgbench: initialising region a's database")
    init = await demo.pgbench("-i", "-q", "-s", "1")
    await init.wait()
    print("backup: base backup of region a into region b's vault")
    await demo.dragent("backup", "postgres", "--config", str(configs["a"]), "--stream", PG_STREAM)
    for region in ("a", "b"):
        agent = AgentProcess(
            configs[region],
            demo.dir / f"agent-{region}.log",
            demo.lab.root / region / "agent.pid",
            demo.lab.agent_url(region),
        )
        demo.agents[region] = agent
        await agent.start()
        await agent.wait_ready(within=60)
        print(f"agent {region}: ready at {agent.url} (log {agent.log_path})")
    print("standby: building region b's warm standby from the vault")
    await demo.dragent("standby", "init", "--config", str(configs["b"]))


async def run_demo(root: Path, seconds: float = 30.0, keep: bool = False) -> int:
    lab = Lab(root)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"lab: starting PostgreSQL, SeaweedFS and etcd for regions a and b in {lab.root}")
    t0 = time.monotonic()
    await lab.up()
    print(f"lab: up in {time.monotonic() - t0:.1f}s")
    demo = Demo(lab)
    code = 1
    bench: asyncio.subprocess.Process | None = None
    try:
        await _start(demo, demo.write_configs())
        await demo.first_wave()
        duration = str(int(seconds) + 5)
        bench = await demo.pgbench("-R", str(PGBENCH_RATE), "-T", duration, "-c", "2")
        samples = await _watch(demo, seconds, stop)
        bench.terminate()
        await bench.wait()
        code = await _finish(demo, samples)
    finally:
        if bench is not None and bench.returncode is None:
            bench.terminate()
            await bench.wait()
        for agent in demo.agents.values():
            await agent.stop()
        await demo.teardown_pg()
        if not keep:
            await lab.down(purge=True)
            print("lab: down (removed)")
    return code


async def _finish(demo: Demo, samples: dict[str, list[float]]) -> int:
    print("stopping: pgbench stopped; draining region a's agent")
    rows_a = await demo.history_rows(demo.lab.pg_dsn("a"))
    await demo.agents["a"].stop()
    followed = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # let region b apply what region a shipped
        followed = await demo.history_rows(demo.standby_dsn)
        caught_up = followed is not None and rows_a is not None and followed >= rows_a
        mirrored = await count_objects(demo.bucket("b")) >= await count_objects(demo.bucket("a"))
        if caught_up and mirrored and _versions(demo.lab.root / "b" / "models") >= 2:
            break
        await asyncio.sleep(0.5)
    await demo.agents["b"].stop()
    print("verifying region b's vault (authentication, Merkle roots, continuity):")
    cfg_b = load_config(demo.dir / "b.toml")
    code = await vault_verify(cfg_b, "synthetic", as_json=False)
    code |= await vault_verify(cfg_b, PG_STREAM, as_json=False)
    for name, values in samples.items():
        print(
            f"summary: {name}: RPO at a over {len(values)} samples: p50 "
            f"{_quantile(values, 0.5):.3f}s, p99 {_quantile(values, 0.99):.3f}s, "
            f"max {max(values, default=float('nan')):.3f}s"
        )
    print(f"summary: pgbench history rows: region a {rows_a}, region b's standby {followed}")
    objects = await count_objects(demo.bucket("a")), await count_objects(demo.bucket("b"))
    print(f"summary: objects: region a {objects[0]}, region b's mirror {objects[1]}")
    same: dict[str, bool] = {}
    for version in ("1", "2"):
        same[version] = tree_digest(
            demo.lab.root / "a" / "models" / MODEL / version
        ) == tree_digest(demo.lab.root / "b" / "models" / MODEL / version)
        print(
            f"summary: {MODEL} version {version} in region b: "
            f"{'identical' if same[version] else 'MISSING'}"
        )
    failed = failed_checks(rows_a, followed, objects, same, code)
    for check in failed:
        print(f"FAILED: {check}")
    return 1 if failed else 0


def failed_checks(
    rows_a: int | None,
    rows_b: int | None,
    objects: tuple[int, int],
    models_same: dict[str, bool],
    vault_code: int,
) -> list[str]:
    """The closing checks that failed (empty: the demo kept every promise)."""
    out = []
    if rows_a is None or rows_b is None or rows_b < rows_a or rows_a == 0:
        out.append(f"standby rows: region b's standby has {rows_b} of region a's {rows_a}")
    if objects[1] != objects[0] or objects[0] == 0:
        out.append(f"mirror: region b holds {objects[1]} of region a's {objects[0]} objects")
    for version, same in sorted(models_same.items()):
        if not same:
            out.append(f"model identity: version {version} differs or is missing in region b")
    if vault_code:
        out.append("vault verification: region b's vault did not verify (see above)")
    return out
