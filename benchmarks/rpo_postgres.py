"""Measured RPO of PostgreSQL WAL shipping, side by side with its baselines, in one run.

Usage: ``python benchmarks/rpo_postgres.py [--seconds 60] [--rate 200] [--json]
[--segment-max-age 0.2] [--async-archive-timeout 10] [--lab-dir DIR]``

A fresh lab (real PostgreSQL 15 and SeaweedFS) runs ``pgbench`` at a fixed rate
(``-R``) against region a's primary, once per pgBackRest configuration, for
``--seconds`` each. Shippers take the same WAL at the same time:

- **dragent**: the postgres source (a physical slot) sealing segments into
  region b's vault (``--segment-max-age``, default 200 ms; 8 MiB), in-process;
- **pg_receivewal** to a local directory (``--synchronous``): the floor of
  streaming, with no object store at all;
- **pgBackRest** (Debian ``pgbackrest``) from ``archive_command`` into a
  repository in the same bucket of the same SeaweedFS as dragent's vault, in
  two configurations, one per window (a cluster has one ``archive_timeout``):
  ``archive-push`` with ``archive_timeout = 60s`` (the PostgreSQL manual's "a
  minute or so"), then ``archive-push`` with ``archive-async`` (two push
  processes) at ``archive_timeout = 10s`` (``--async-archive-timeout``).

Why 10 s is the lowest a careful operator would run: a forced switch closes a
whole 16 MiB WAL file however little it holds, so the archive's file count,
requests and the primary's WAL writes grow as 1/timeout whether or not the
database is busy (8,640 files a day at 10 s, 17,280 at 5 s); the PostgreSQL
manual calls very short settings unwise for that reason. With archive-async
the pushes leave the archiver's path, so 10 s keeps up on a small machine, and
it is a sixth of the manual's "a minute or so"; below that the cost doubles
for each few seconds of RPO.

SeaweedFS here speaks plain HTTP and pgBackRest's S3 driver only HTTPS, so
pgBackRest reaches the store through a counting HTTPS front
(``benchmarks/_s3count.py``) that forwards every request unchanged and counts
them by operation (GET, LIST, PUT...). dragent's requests are its own metric
(``dragent_store_requests_total``, ``replicators/store_metrics.py``): PUT, GET,
HEAD and LIST, all counted. Bytes stored are the growth of each one's prefix
in the bucket over its window(s). Per hour means over the measured time.

Every second a heartbeat is written into the WAL (``pg_logical_emit_message``)
and its LSN and wall time are recorded. A poller reads, every 20 ms, each
shipper's durable position as the primary sees it: ``flush_lsn`` of its
walsender in ``pg_stat_replication`` (dragent reports flush only once the
segment is in the vault; pg_receivewal once fsynced), and for pgBackRest the
end of the last archived WAL file (``pg_stat_archiver``; with archive-async,
archive-push succeeds only once the file is in the repository). A heartbeat's
RPO is the time from its write until its LSN was durable; after each window
the benchmark waits for the tail to become durable, so every heartbeat is
measured to the end. We report p50/p99/max. dragent and pg_receivewal are
measured over both windows, each pgBackRest configuration over its own.

Then zero-loss mode's cost: the p50/p99 commit latency of single-row
transactions, for 10 s each, asynchronous and with dragent's slot listed in
``synchronous_standby_names``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import load_config
from agent.lab import Lab
from benchmarks._baseline import require
from benchmarks._pgbackrest import archive_command, run_pgbackrest, s3_repo
from benchmarks._s3count import CountingProxy
from replicators.keys import build_key_provider
from replicators.metrics import Metrics
from replicators.postgres import lsn as L
from replicators.postgres.options import PostgresOptions
from replicators.postgres.walsource import WalSource
from replicators.progress import StreamProgress
from replicators.s3 import S3Store
from replicators.settings import S3Config, Secret
from replicators.shipper import Shipper, ShipperSettings
from replicators.store_metrics import InstrumentedStore, StoreMetrics
from replicators.vault import Vault

SLOT = "dragent_bench"
RW_SLOT = "bench_receivewal"
STREAM = "pg-bench"
STANZA = "bench"
PGBACKREST_PREFIX = {"sync": "pgbackrest-sync/", "async": "pgbackrest-async/"}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Durable:
    """Durable positions over time of one shipper, as (time, lsn) samples."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []

    def add(self, at: float, lsn: int | None) -> None:
        if lsn is not None and (not self.samples or lsn > self.samples[-1][1]):
            self.samples.append((at, lsn))

    def rpo(self, heartbeats: list[tuple[int, float]], end: float) -> list[float]:
        out = []
        for lsn, t in heartbeats:
            reached = next((at for at, pos in self.samples if pos >= lsn), None)
            out.append((reached if reached is not None else end) - t)
        return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    lab_dir = Path(args.lab_dir or tempfile.mkdtemp(prefix="dragent-rpo-bench-"))
    lab = Lab(lab_dir / "lab")
    await lab.up()
    work = _workdir()
    try:
        return await _bench(args, lab, work)
    finally:
        await lab.down(purge=not args.lab_dir)
        shutil.rmtree(work, ignore_errors=True)


def _workdir() -> Path:
    work = Path(tempfile.mkdtemp(prefix="rpo-bench-", dir="/tmp"))
    work.chmod(0o755)  # reachable by the postgres OS user
    return work


async def _sql(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for s in statements:
            await conn.execute(s)
    finally:
        await conn.close()


async def _proc(argv: list[str], **kw: Any) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, **kw
    )


async def _setup_pgbackrest(
    lab: Lab, work: Path, proxy: CountingProxy, vault: S3Config
) -> dict[str, Path]:
    """Two pgBackRest configurations, each its own repository in the vault's bucket
    (through the counting HTTPS front): ``sync`` (archive-push stores each WAL file
    before returning) and ``async`` (``archive-async``: a background process pushes
    queued WAL files, two at a time). Both with pgBackRest's defaults otherwise."""
    pg = lab.postgres("a")
    creds = lab.s3_credentials
    confs = {}
    for mode in ("sync", "async"):
        home = work / f"pgbackrest-{mode}"
        home.mkdir()
        shutil.chown(home, "postgres", "postgres")
        extra = ""
        if mode == "async":
            extra = f"archive-async=y\nspool-path={home}\n[global:archive-push]\nprocess-max=2\n"
        conf = work / f"pgbackrest-{mode}.conf"
        repo = s3_repo(1, proxy.port, vault, creds, PGBACKREST_PREFIX[mode].rstrip("/"))
        conf.write_text(
            f"[global]\n{repo}"
            f"log-level-console=warn\nlog-level-file=warn\nlog-path={home}\n"
            f"lock-path={home}\n{extra}"
            f"[bench]\npg1-path={pg.data_dir}\npg1-port={pg.port}\npg1-host-user=postgres\n"
            f"pg1-socket-path={pg.socket_dir}\n"
        )
        conf.chmod(0o644)
        confs[mode] = conf
    await _sql(
        lab.pg_dsn("a"),
        "ALTER SYSTEM SET archive_mode = on",
        f"ALTER SYSTEM SET archive_command = '{_archive_command(confs['sync'])}'",
        "ALTER SYSTEM SET archive_timeout = '60s'",
    )
    await lab.fault("a", "postgres", "restart")
    for conf in confs.values():
        await run_pgbackrest(conf, STANZA, "stanza-create")
    return confs


def _archive_command(conf: Path) -> str:
    return archive_command(conf, STANZA)


async def _prefix_bytes(store: S3Store, prefix: str) -> int:
    return sum([i.size async for i in store.list(prefix)])


def _dragent_requests(registry: CollectorRegistry) -> Counter[str]:
    """dragent's own count of its vault requests (``dragent_store_requests_total``, the
    agent's metric), by S3 operation: put PUT, get GET, stat HEAD, list LIST (one per
    listing: a listing of over 1,000 keys would take more LIST requests)."""
    names = {"put": "PUT", "get": "GET", "stat": "HEAD", "list": "LIST", "delete": "DELETE"}
    out: Counter[str] = Counter()
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "dragent_store_requests_total":
                out[names.get(sample.labels["op"], sample.labels["op"])] += int(sample.value)
    return out


def _per_hour(counts: Counter[str], hours: float) -> dict[str, int]:
    """Requests per hour by operation; PUT, GET, HEAD and LIST always shown."""
    ops = {"PUT", "GET", "HEAD", "LIST", *counts}
    return {op: round(counts[op] / hours) for op in sorted(ops)}


async def _bench(args: argparse.Namespace, lab: Lab, work: Path) -> dict[str, Any]:
    primary = lab.pg_dsn("a")
    pg = lab.postgres("a")
    cfg_a = load_config(lab.config_path("a"))
    vault_cfg = cfg_a.peers[0].vault
    proxy = CountingProxy(vault_cfg.endpoint or "")
    proxy.start()
    try:
        return await _bench_with(args, lab, work, primary, pg, vault_cfg, proxy)
    finally:
        proxy.stop()


async def _bench_with(
    args: argparse.Namespace,
    lab: Lab,
    work: Path,
    primary: str,
    pg: Any,
    vault_cfg: S3Config,
    proxy: CountingProxy,
) -> dict[str, Any]:
    confs = await _setup_pgbackrest(lab, work, proxy, vault_cfg)
    init = await _proc(pg.command("pgbench", "-i", "-s", "2", "-q", primary))
    await init.communicate()

    store = await S3Store.open(vault_cfg)
    registry = CollectorRegistry()
    counted = InstrumentedStore(store, StoreMetrics(registry), "vault")
    keys = build_key_provider(load_config(lab.config_path("a")).peers[0].keys)
    options = PostgresOptions(dsn=Secret(primary, "bench"), slot=SLOT)
    progress = StreamProgress(STREAM, "postgres", "source", "b")
    shipper = Shipper(
        ShipperSettings(STREAM, "b", 1, 8 << 20, args.segment_max_age),
        WalSource(options, "b", STREAM),
        Vault(counted),
        keys,
        work / "shipped.json",
        progress,
        Metrics(CollectorRegistry()).stream(STREAM, "b"),
    )
    rw_dir = work / "receivewal"
    rw_dir.mkdir()
    shutil.chown(rw_dir, "postgres", "postgres")
    await _sql(primary, f"SELECT pg_create_physical_replication_slot('{RW_SLOT}', true)")
    receivewal = await _proc(
        pg.command(
            "pg_receivewal", "-d", primary, "-D", str(rw_dir), "-S", RW_SLOT, "--synchronous", "-n"
        )
    )
    phases = {
        "pgbackrest": ("sync", 60.0),
        "pgbackrest_async": ("async", float(args.async_archive_timeout)),
    }
    durable = {"dragent": Durable(), "pg_receivewal": Durable()}
    durable |= {name: Durable() for name in phases}
    archiving = {"to": "pgbackrest"}  # the pgBackRest configuration archiving now
    heartbeats: list[tuple[int, float]] = []
    gauge: list[float] = []
    stop = asyncio.Event()

    async def ship() -> None:
        await shipper.recover()
        while not stop.is_set():
            await shipper.sync_once(stop)
        await shipper.source.aclose()

    async def beat(conn: asyncpg.Connection) -> None:
        while not stop.is_set():
            t = time.time()
            lsn = await conn.fetchval(
                "SELECT pg_logical_emit_message(false, 'dragent-bench', $1)::text", str(t)
            )
            heartbeats.append((L.parse_lsn(lsn), t))
            await asyncio.sleep(1.0)

    async def poll(conn: asyncpg.Connection) -> None:
        while not stop.is_set():
            rows = await conn.fetch(
                "SELECT application_name, flush_lsn::text FROM pg_stat_replication"
            )
            now = time.time()
            for r in rows:
                name = "dragent" if r[0] == SLOT else r[0]
                if name in durable and r[1]:
                    durable[name].add(now, L.parse_lsn(r[1]))
            last = await conn.fetchval("SELECT last_archived_wal FROM pg_stat_archiver")
            if last and not last.endswith(".partial") and len(last) == 24:
                end = L.parse_wal_file_name(last)[1] + L.WAL_SEGMENT_SIZE
                durable[archiving["to"]].add(now, end)
            gauge.append(progress.rpo(now))
            await asyncio.sleep(0.02)

    async def caught_up(names: list[str], lsn: int, within: float) -> None:
        until = time.monotonic() + within
        while time.monotonic() < until:
            if all(durable[n].samples and durable[n].samples[-1][1] >= lsn for n in names):
                return
            await asyncio.sleep(0.1)

    async def archived(conn: asyncpg.Connection) -> tuple[int, int]:
        row = await conn.fetchrow("SELECT archived_count, failed_count FROM pg_stat_archiver")
        return int(row[0]), int(row[1])

    windows: list[tuple[float, float]] = []
    stats: dict[str, dict[str, Any]] = {}
    beat_conn, poll_conn = await asyncpg.connect(primary), await asyncpg.connect(primary)
    ctl_conn = await asyncpg.connect(primary)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(ship())
            head = L.parse_lsn(await poll_conn.fetchval("SELECT pg_current_wal_insert_lsn()::text"))
            for _ in range(600):  # ship pgbench's initial load before measuring
                if shipper.end >= head:
                    break
                await asyncio.sleep(0.1)
            tg.create_task(beat(beat_conn))
            tg.create_task(poll(poll_conn))
            for name, (mode, timeout) in phases.items():
                await _sql(
                    primary,
                    f"ALTER SYSTEM SET archive_command = '{_archive_command(confs[mode])}'",
                    f"ALTER SYSTEM SET archive_timeout = '{timeout:g}s'",
                    "SELECT pg_reload_conf()",
                )
                await asyncio.sleep(1.0)
                archiving["to"] = name
                switched = await ctl_conn.fetchval("SELECT pg_switch_wal()::text")
                await caught_up([name], L.parse_lsn(switched), 60)  # start with an empty queue
                at = await _phase_mark(ctl_conn, store, registry, proxy, name, archived)
                started = time.time()
                bench = await _proc(
                    pg.command(
                        "pgbench", "-n", "-R", str(args.rate), "-T", str(args.seconds),
                        "-c", "4", "-j", "2", primary,
                    )
                )  # fmt: skip
                await bench.communicate()
                ended = time.time()
                last = max(lsn for lsn, t in heartbeats if t <= ended)
                # every shipper's RPO measured to the end: wait for the tail to be durable
                await caught_up(["dragent", "pg_receivewal", name], last, timeout + 30)
                done = await _phase_mark(ctl_conn, store, registry, proxy, name, archived)
                windows.append((started, ended))
                stats[name] = _phase_stats(at, done, time.time() - started)
                stats[name]["window"] = (started, ended)
            stop.set()
        commit = await _commit_costs(primary, store, keys, work)
    finally:
        receivewal.terminate()
        await receivewal.wait()
        await beat_conn.close()
        await poll_conn.close()
        await ctl_conn.close()
        await keys.aclose()
        await store.aclose()
    rows: dict[str, Any] = {}
    in_windows = [(lsn, t) for lsn, t in heartbeats if any(a <= t <= b for a, b in windows)]
    for name in ("dragent", "pg_receivewal", *phases):
        beats = in_windows
        if name in phases:
            a, b = stats[name]["window"]
            beats = [(lsn, t) for lsn, t in heartbeats if a <= t <= b]
        rpo = durable[name].rpo(beats, time.time())
        rows[name] = {
            "rpo_p50": pct(rpo, 0.5),
            "rpo_p99": pct(rpo, 0.99),
            "rpo_max": max(rpo) if rpo else float("nan"),
            "heartbeats": len(rpo),
        }
    hours = sum(stats[n]["hours"] for n in phases)
    dragent_ops: Counter[str] = Counter()
    dragent_bytes = 0
    for name in phases:
        dragent_ops.update(stats[name]["dragent_ops"])
        dragent_bytes += stats[name]["dragent_bytes"]
        mode, timeout = phases[name]
        ops = stats[name]["pgbackrest_ops"]
        hours_n = stats[name]["hours"]
        rows[name] |= {
            "label": f"pgBackRest archive-push{' archive-async' if mode == 'async' else ''}, "
            f"archive_timeout = {timeout:g} s",
            "archive_timeout": timeout,
            "archived_files": stats[name]["archived"],
            "archive_failures": stats[name]["failed"],
            "object_store_requests_per_hour": round(sum(ops.values()) / hours_n),
            "requests_per_hour_by_op": _per_hour(ops, hours_n),
            "bytes_stored": stats[name]["pgbackrest_bytes"],
            "bytes_stored_per_hour": round(stats[name]["pgbackrest_bytes"] / hours_n),
        }
        if not stats[name]["archived"]:
            raise SystemExit(f"{rows[name]['label']}: archived nothing in its window")
    rows["dragent"] |= {
        "label": f"dragent, segment_max_age = {args.segment_max_age:g} s",
        "object_store_requests_per_hour": round(sum(dragent_ops.values()) / hours),
        "requests_per_hour_by_op": _per_hour(dragent_ops, hours),
        "bytes_stored": dragent_bytes,
        "bytes_stored_per_hour": round(dragent_bytes / hours),
        "exported_rpo_gauge_p99": pct(gauge, 0.99),
    }
    rows["pg_receivewal"] |= {
        "label": "pg_receivewal --synchronous to local disk (no object store)",
        "object_store_requests_per_hour": 0,
    }
    return {
        "seconds": args.seconds,
        "segment_max_age": args.segment_max_age,
        "rate_tps": args.rate,
        "async_archive_timeout": args.async_archive_timeout,
        "hours_measured": round(hours, 4),
        "shippers": rows,
        "commit_latency_ms": commit,
    }


async def _phase_mark(
    conn: asyncpg.Connection,
    store: S3Store,
    registry: CollectorRegistry,
    proxy: CountingProxy,
    name: str,
    archived: Any,
) -> dict[str, Any]:
    mode = "async" if name.endswith("async") else "sync"
    count, failed = await archived(conn)
    return {
        "at": time.time(),
        "archived": count,
        "failed": failed,
        "pgbackrest_ops": Counter(proxy.snapshot()),
        "pgbackrest_bytes": await _prefix_bytes(store, PGBACKREST_PREFIX[mode]),
        "dragent_ops": _dragent_requests(registry),
        "dragent_bytes": await _prefix_bytes(store, f"streams/{STREAM}/"),
    }


def _phase_stats(at: dict[str, Any], done: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {
        "hours": seconds / 3600,
        "archived": done["archived"] - at["archived"],
        "failed": done["failed"] - at["failed"],
        "pgbackrest_ops": done["pgbackrest_ops"] - at["pgbackrest_ops"],
        "pgbackrest_bytes": done["pgbackrest_bytes"] - at["pgbackrest_bytes"],
        "dragent_ops": done["dragent_ops"] - at["dragent_ops"],
        "dragent_bytes": done["dragent_bytes"] - at["dragent_bytes"],
    }


async def _commit_costs(primary: str, store: S3Store, keys: Any, work: Path) -> dict[str, float]:
    """p50/p99 single-row commit latency, asynchronous then with dragent's slot synchronous
    (a source with ``synchronous = true``, which ships as soon as the stream goes quiet)."""
    out: dict[str, float] = {}
    options = PostgresOptions(dsn=Secret(primary, "bench"), slot=SLOT, synchronous=True)
    shipper = Shipper(
        ShipperSettings(STREAM, "b", 1, 8 << 20, 0.2),
        WalSource(options, "b", STREAM),
        Vault(store),
        keys,
        work / "shipped.json",
        StreamProgress(STREAM, "postgres", "source", "b"),
        Metrics(CollectorRegistry()).stream(STREAM, "b"),
    )
    await _sql(primary, "CREATE TABLE IF NOT EXISTS bench_commit (id bigserial, t float8)")
    stop = asyncio.Event()

    async def ship() -> None:
        await shipper.recover()
        while not stop.is_set():
            await shipper.sync_once(stop)
        await shipper.source.aclose()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(ship())
        for mode in ("async", "sync"):
            if mode == "sync":
                await _sql(
                    primary,
                    f"ALTER SYSTEM SET synchronous_standby_names = '\"{SLOT}\"'",
                    "SELECT pg_reload_conf()",
                )
                await asyncio.sleep(1.0)
            conn = await asyncpg.connect(primary)
            lat = []
            try:
                until = time.monotonic() + 10
                while time.monotonic() < until:
                    t0 = time.perf_counter()
                    await conn.execute("INSERT INTO bench_commit (t) VALUES (1)")
                    lat.append((time.perf_counter() - t0) * 1000)
            finally:
                await conn.close()
            out[f"{mode}_p50"] = round(statistics.median(lat), 2)
            out[f"{mode}_p99"] = round(pct(lat, 0.99), 2)
            out[f"{mode}_commits"] = len(lat)
        await _sql(
            primary, "ALTER SYSTEM RESET synchronous_standby_names", "SELECT pg_reload_conf()"
        )
        stop.set()
    return out


def table(result: dict[str, Any]) -> str:
    rows = result["shippers"]
    lines = [
        f"pgbench at {result['rate_tps']} tps, {result['seconds']} s per pgBackRest "
        f"configuration ({result['hours_measured'] * 3600:.0f} s measured in all); dragent "
        f"and pg_receivewal over both windows, each pgBackRest row over its own",
        f"{'shipper':<64}{'RPO p50 s':>10}{'p99 s':>8}{'max s':>8}{'beats':>6}"
        f"{'req/hour':>10}{'MB stored/h':>12}",
    ]
    for r in rows.values():
        stored = r.get("bytes_stored_per_hour")
        lines.append(
            f"{r['label']:<64}{r['rpo_p50']:>10.3f}{r['rpo_p99']:>8.3f}{r['rpo_max']:>8.3f}"
            f"{r['heartbeats']:>6}{r['object_store_requests_per_hour']:>10}"
            f"{(f'{stored / 1e6:.1f}' if stored is not None else '-'):>12}"
        )
    lines.append("requests per hour by operation:")
    for r in rows.values():
        if r.get("requests_per_hour_by_op"):
            ops = ", ".join(f"{op} {n}" for op, n in r["requests_per_hour_by_op"].items())
            lines.append(f"  {r['label']}: {ops}")
    gauge = rows["dragent"]["exported_rpo_gauge_p99"]
    lines.append(f"dragent_rpo_seconds gauge p99 over the run: {gauge:.3f} s")
    c = result["commit_latency_ms"]
    lines.append(
        f"commit latency ms, async p50 {c['async_p50']} p99 {c['async_p99']}; "
        f"synchronous (zero-loss) p50 {c['sync_p50']} p99 {c['sync_p99']}"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--rate", type=int, default=200, help="pgbench transactions per second")
    parser.add_argument("--segment-max-age", type=float, default=0.2, help="seconds")
    parser.add_argument(
        "--async-archive-timeout",
        type=float,
        default=10.0,
        help="archive_timeout of the pgBackRest archive-async row, seconds",
    )
    parser.add_argument("--lab-dir", help="use (and keep) this lab directory")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    args = parser.parse_args()
    require("pgbackrest", "pg_receivewal")
    result = asyncio.run(run(args))
    if args.json:
        print(table(result), file=sys.stderr)
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(table(result))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
