"""Zero-loss commits across a link with distance: PostgreSQL's own synchronous
replication against dragent's zero-loss mode, with and without group commit.

Usage: ``python benchmarks/sync.py [--delay 0.02] [--seconds 10] [--clients 1,4,16]
[--in-flight 4] [--json] [--lab-dir DIR]``

One lab (region a's primary, region b's SeaweedFS vault). Everything that crosses
the regions goes through one relay that holds each chunk ``--delay`` seconds each way
(``agent/lab/slowlink.py``: this kernel has no ``netem``), so a round trip gains
``2 × delay`` (40 ms by default):

- **native**: a physical standby of the primary (``pg_basebackup -R``), streaming
  through the relay, named in the primary's ``synchronous_standby_names``
  (``synchronous_commit = on``: a commit returns once the standby has flushed it).
- **dragent zero-loss, group commit, one PUT at a time**: the agent's slot in
  ``synchronous_standby_names`` (its ``SyncGuard``), the shipper's vault reached
  through the relay; a commit returns once the segment holding it is durable in the
  vault. While one segment's PUT is in flight, the WAL of every commit that arrives
  meanwhile is gathered into the next segment (``segment_max_bytes`` as configured).
- **dragent zero-loss, pipelined** (the default in zero-loss mode): as group commit,
  and up to 4 segments' PUTs in flight at once, acknowledged in order, so a commit
  waits about one PUT rather than the one in flight plus its own.
- **dragent zero-loss, one segment per WAL message**: ``segment_max_bytes = 1``, so
  every message the walsender sends becomes its own segment and its own PUT: the
  behaviour of a shipper without group commit.

For each mode and client count, ``--clients`` asyncpg connections insert one row per
transaction for ``--seconds``; each commit's latency is timed on the client the same
way in every mode. Reported: commits per second, latency p50/p99, and for dragent the
PUTs it made (segments published) per hour at that load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import load_config
from agent.lab import Lab
from agent.lab.postgres import chown_for_postgres
from agent.lab.slowlink import SlowLink
from replicators.keys import build_key_provider
from replicators.metrics import Metrics
from replicators.postgres.guard import SyncGuard
from replicators.postgres.options import PostgresOptions
from replicators.postgres.walsource import WalSource
from replicators.progress import StreamProgress
from replicators.s3 import S3Store
from replicators.settings import Secret
from replicators.shipper import Shipper, ShipperSettings
from replicators.vault import Vault

TABLE = "sync_bench"
STANDBY = "bench_standby"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sql(dsn: str, *statements: str) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return [await conn.fetchval(s) for s in statements]
    finally:
        await conn.close()


async def load(dsn: str, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` connections committing one-row inserts for ``seconds``."""
    latencies: list[float] = []
    conns = [await asyncpg.connect(dsn) for _ in range(clients)]
    deadline = time.monotonic() + seconds

    async def worker(w: int, conn: asyncpg.Connection) -> None:
        i = 0
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            await conn.execute(f"INSERT INTO {TABLE} (w, i) VALUES ($1, $2)", w, i)
            latencies.append(time.monotonic() - t0)
            i += 1

    began = time.monotonic()
    try:
        await asyncio.gather(*(worker(w, c) for w, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.close()
    took = time.monotonic() - began
    return {
        "commits": len(latencies),
        "seconds": round(took, 3),
        "commits_per_s": round(len(latencies) / took, 1),
        "latency_p50_ms": round(pct(latencies, 0.5) * 1000, 2),
        "latency_p99_ms": round(pct(latencies, 0.99) * 1000, 2),
    }


async def wait_until(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await check():
                return
        await asyncio.sleep(0.2)
    raise SystemExit(f"sync benchmark: {what} not within {within:.0f}s")


async def set_sync_names(dsn: str, names: str) -> None:
    await sql(dsn, f"ALTER SYSTEM SET synchronous_standby_names = '{names}'",
              "SELECT pg_reload_conf()")  # fmt: skip


async def native(lab: Lab, work: Path, delay: float, clients: list[int], seconds: float) -> dict:
    primary = lab.pg_dsn("a")
    server = lab.postgres("a")
    link = SlowLink("127.0.0.1", server.port, delay=delay)
    port = await link.start()
    data = work / "standby"
    data.mkdir()
    chown_for_postgres(work)
    chown_for_postgres(data)
    data.chmod(0o700)
    conninfo = f"host=127.0.0.1 port={port} user=dragent application_name={STANDBY}"
    standby_port = _free_port()
    rows: dict[str, Any] = {}
    try:
        await _run(server.command("pg_basebackup", "-D", str(data), "-d", conninfo, "-R",
                                  "-X", "stream", "-c", "fast"))  # fmt: skip
        with (data / "postgresql.auto.conf").open("a") as f:
            f.write(f"port = {standby_port}\nunix_socket_directories = ''\n")
        await _run(server.command("pg_ctl", "-D", str(data), "-l", str(work / "standby.log"),
                                  "-W", "start"))  # fmt: skip
        await set_sync_names(primary, STANDBY)

        async def synchronous() -> bool:
            q = "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1"
            conn = await asyncpg.connect(primary)
            try:
                return await conn.fetchval(q, STANDBY) == "sync"
            finally:
                await conn.close()

        await wait_until(synchronous, 60, "the standby in sync")
        for n in clients:
            rows[str(n)] = await load(primary, n, seconds)
            print(f"native {n:>2} clients: {rows[str(n)]}", file=sys.stderr)
    finally:
        await set_sync_names(primary, "")
        await _run(
            server.command("pg_ctl", "-D", str(data), "-m", "immediate", "stop"), check=False
        )
        await link.aclose()
    return rows


async def dragent(
    lab: Lab,
    work: Path,
    delay: float,
    clients: list[int],
    seconds: float,
    *,
    max_bytes: int,
    name: str,
    in_flight: int = 1,
) -> dict:
    cfg = load_config(lab.config_path("a"))
    peer = cfg.peers[0]
    s3_port = int(str(peer.vault.endpoint).rsplit(":", 1)[1])
    link = SlowLink("127.0.0.1", s3_port, delay=delay)
    port = await link.start()
    store = await S3Store.open(
        peer.vault.model_copy(update={"endpoint": f"http://127.0.0.1:{port}"})
    )
    keys = build_key_provider(peer.keys)
    primary = lab.pg_dsn("a")
    stream = f"sync-bench-{name}-{time.time_ns() % 10**6}"
    slot = "dragent_" + stream.replace("-", "_")
    options = PostgresOptions(dsn=Secret(primary, "bench"), slot=slot, synchronous=True)
    metrics = Metrics(CollectorRegistry())
    shipper = Shipper(
        ShipperSettings(stream, "b", 1, max_bytes, 0.2, in_flight),
        WalSource(options, "b", stream),
        Vault(store),
        keys,
        work / f"{name}-shipped.json",
        StreamProgress(stream, "postgres", "source", "b"),
        metrics.stream(stream, "b"),
    )
    guard = SyncGuard(options, stream, slot)
    stop = asyncio.Event()
    rows: dict[str, Any] = {}

    async def ship() -> None:
        await shipper.recover()
        while not stop.is_set():
            if not await shipper.sync_once(stop):
                await asyncio.sleep(0.01)

    async def keep_guard() -> None:
        await guard.recover()
        while not stop.is_set():
            await guard.sync_once(stop)
            await asyncio.sleep(0.2)

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(ship())
            tg.create_task(keep_guard())
            try:

                async def listed() -> bool:
                    return guard.synchronous

                await wait_until(listed, 60, "zero-loss mode")
                for n in clients:
                    first = shipper.last.seq if shipper.last else 0
                    row = await load(primary, n, seconds)
                    puts = (shipper.last.seq if shipper.last else 0) - first
                    row["puts"] = puts
                    row["puts_per_hour"] = round(puts / row["seconds"] * 3600)
                    row["commits_per_put"] = round(row["commits"] / max(1, puts), 2)
                    rows[str(n)] = row
                    print(f"dragent {name} {n:>2} clients: {row}", file=sys.stderr)
            finally:
                await set_sync_names(primary, "")  # before the shipper stops: nothing blocks
                stop.set()
    finally:
        await keys.aclose()
        await store.aclose()
        await link.aclose()
        with contextlib.suppress(Exception):
            await sql(primary, f"SELECT pg_drop_replication_slot('{slot}')")
    return rows


def _free_port() -> int:
    from agent.lab.ports import free_port

    return free_port()


async def _run(argv: list[str], check: bool = True) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if check and proc.returncode:
        raise SystemExit(f"{argv[0]} failed: {out.decode(errors='replace')[-600:]}")


async def put_rtt(lab: Lab, delay: float) -> float:
    """The median time of one 4 KiB PUT into region b's vault through the relay."""
    cfg = load_config(lab.config_path("a"))
    vault = cfg.peers[0].vault
    link = SlowLink("127.0.0.1", int(str(vault.endpoint).rsplit(":", 1)[1]), delay=delay)
    port = await link.start()
    store = await S3Store.open(vault.model_copy(update={"endpoint": f"http://127.0.0.1:{port}"}))
    times = []
    try:
        for i in range(20):
            t0 = time.monotonic()
            await store.put(f"probes/sync-bench-{i}", b"x" * 4096)
            times.append(time.monotonic() - t0)
            await store.delete(f"probes/sync-bench-{i}")
    finally:
        await store.aclose()
        await link.aclose()
    return pct(times, 0.5)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    lab_dir = Path(args.lab_dir or tempfile.mkdtemp(prefix="dragent-sync-bench-"))
    lab = Lab(lab_dir / "lab")
    await lab.up()
    work = Path(tempfile.mkdtemp(prefix="sync-bench-", dir="/tmp"))
    os.chmod(work, 0o755)  # reachable by the postgres OS user
    clients = [int(c) for c in args.clients.split(",")]
    try:
        primary = lab.pg_dsn("a")
        await sql(primary, f"DROP TABLE IF EXISTS {TABLE}",
                  f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, w int, i int)")  # fmt: skip
        rtt = await put_rtt(lab, args.delay)
        out: dict[str, Any] = {
            "delay_each_way_ms": args.delay * 1000,
            "pipelined_in_flight": args.in_flight,
            "put_p50_ms": round(rtt * 1000, 1),
            "seconds_per_point": args.seconds,
            "native": await native(lab, work, args.delay, clients, args.seconds),
            "dragent_pipelined": await dragent(
                lab,
                work,
                args.delay,
                clients,
                args.seconds,
                max_bytes=8 << 20,
                name="pipe",
                in_flight=args.in_flight,
            ),
            "dragent_group_commit": await dragent(
                lab, work, args.delay, clients, args.seconds, max_bytes=8 << 20, name="group"
            ),
            "dragent_segment_per_message": await dragent(
                lab, work, args.delay, clients, args.seconds, max_bytes=1, name="single"
            ),
        }
    finally:
        await lab.down(purge=not args.lab_dir)
        shutil.rmtree(work, ignore_errors=True)
    top = str(max(clients))
    native_rate = out["native"][top]["commits_per_s"]
    pipe = out["dragent_pipelined"][top]
    group = out["dragent_group_commit"][top]
    single = out["dragent_segment_per_message"][top]
    out["summary"] = {
        f"pipelined_vs_native_at_{top}_ratio": round(pipe["commits_per_s"] / native_rate, 3),
        f"group_vs_native_at_{top}_ratio": round(group["commits_per_s"] / native_rate, 3),
        # at the same commit rate, one segment per message makes one PUT per commit or so
        f"puts_per_commit_single_over_pipelined_at_{top}_ratio": round(
            (single["puts"] / max(1, single["commits"])) / (pipe["puts"] / max(1, pipe["commits"])),
            1,
        ),
        "target": "zero-loss ≥ 0.5 × native throughput at the most clients; "
        "PUTs per commit ≥ 10× fewer than one segment per message",
    }
    return out


def table(out: dict[str, Any]) -> str:
    lines = [
        f"link: +{out['delay_each_way_ms']:.0f} ms each way; one 4 KiB PUT p50 "
        f"{out['put_p50_ms']} ms; {out['seconds_per_point']} s per point",
        f"{'mode':<28} {'clients':>7} {'commits/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'PUTs/hour':>10}",
    ]
    for mode in ("native", "dragent_pipelined", "dragent_group_commit",
                 "dragent_segment_per_message"):  # fmt: skip
        for n, row in out[mode].items():
            lines.append(
                f"{mode:<28} {n:>7} {row['commits_per_s']:>10} {row['latency_p50_ms']:>8} "
                f"{row['latency_p99_ms']:>8} {row.get('puts_per_hour', '-'):>10}"
            )
    lines.append(json.dumps(out["summary"]))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", type=float, default=0.02, help="seconds added each way")
    parser.add_argument("--seconds", type=float, default=10.0, help="per mode and client count")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument(
        "--in-flight", type=int, default=4, help="the pipelined mode's segments in flight"
    )
    parser.add_argument("--lab-dir", help="use (and keep) this lab directory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = asyncio.run(run(args))
    print(table(out), file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
