"""Measured RPO of PostgreSQL WAL shipping, side by side with two baselines, in one run.

Usage: ``python benchmarks/rpo_postgres.py [--seconds 60] [--rate 200] [--json]
[--segment-max-age 0.2] [--lab-dir DIR]``

A fresh lab (real PostgreSQL 15 and SeaweedFS) runs ``pgbench`` at a fixed rate
(``-R``) against region a's primary for ``--seconds``. Three shippers take the
same WAL at the same time:

- **dragent**: the postgres source (a physical slot) sealing segments into
  region b's vault (``--segment-max-age``, default 200 ms; 8 MiB), in-process;
- **pg_receivewal** to a local directory (``--synchronous``): the floor of
  streaming, with no object store at all;
- **pgBackRest** ``archive-push`` (Debian ``pgbackrest``) from
  ``archive_command`` with ``archive_timeout = 60s``, into a local posix
  repository (SeaweedFS here speaks only plain HTTP, which pgBackRest's S3
  driver refuses). A missing ``pgbackrest`` or ``pg_receivewal`` stops the
  benchmark before it starts (``deploy/lab/install-system-deps.sh`` installs
  both); a pgBackRest that fails to set up stops it too: no row is dropped.

Every second a heartbeat is written into the WAL (``pg_logical_emit_message``)
and its LSN and wall time are recorded. A poller reads, every 20 ms, each
shipper's durable position as the primary sees it: ``flush_lsn`` of its
walsender in ``pg_stat_replication`` (dragent reports flush only once the
segment is in the vault; pg_receivewal once fsynced), and for pgBackRest the
end of the last archived WAL file (``pg_stat_archiver``). A heartbeat's RPO is
the time from its write until its LSN was durable; heartbeats still not durable
at the end count with the time they had waited (a lower bound). We report
p50/p99/max, and object-store requests per hour (dragent: one PUT per segment;
pgBackRest: at least one PUT per archived WAL file).

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
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import load_config
from agent.configbase import Secret
from agent.lab import Lab
from benchmarks._baseline import require
from replicators.keys import build_key_provider
from replicators.metrics import Metrics
from replicators.postgres import lsn as L
from replicators.postgres.options import PostgresOptions
from replicators.postgres.walsource import WalSource
from replicators.progress import StreamProgress
from replicators.s3 import S3Store
from replicators.shipper import Shipper, ShipperSettings
from replicators.vault import Vault

SLOT = "dragent_bench"
RW_SLOT = "bench_receivewal"
STREAM = "pg-bench"


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


async def _setup_pgbackrest(lab: Lab, work: Path) -> Path:
    pg = lab.postgres("a")
    repo = work / "pgbackrest-repo"
    repo.mkdir()
    shutil.chown(repo, "postgres", "postgres")
    conf = work / "pgbackrest.conf"
    conf.write_text(
        f"[global]\nrepo1-path={repo}\nlog-level-console=warn\nlog-path={repo}\n"
        f"lock-path={repo}\nspool-path={repo}\n"
        f"[bench]\npg1-path={pg.data_dir}\npg1-port={pg.port}\npg1-host-user=postgres\n"
        f"pg1-socket-path={pg.socket_dir}\n"
    )
    conf.chmod(0o644)
    cmd = f"pgbackrest --config={conf} --stanza=bench archive-push %p"
    await _sql(
        lab.pg_dsn("a"),
        "ALTER SYSTEM SET archive_mode = on",
        f"ALTER SYSTEM SET archive_command = '{cmd}'",
        "ALTER SYSTEM SET archive_timeout = '60s'",
    )
    await lab.fault("a", "postgres", "restart")
    proc = await _proc(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            "pgbackrest",
            f"--config={conf}",
            "--stanza=bench",
            "stanza-create",
        ]
    )
    _, err = await proc.communicate()
    if proc.returncode:
        raise SystemExit(f"pgBackRest stanza-create failed: {err.decode()[-300:]}")
    return conf


async def _bench(args: argparse.Namespace, lab: Lab, work: Path) -> dict[str, Any]:
    primary = lab.pg_dsn("a")
    pg = lab.postgres("a")
    await _setup_pgbackrest(lab, work)
    init = await _proc(pg.command("pgbench", "-i", "-s", "2", "-q", primary))
    await init.communicate()

    cfg_a = load_config(lab.config_path("a"))
    store = await S3Store.open(cfg_a.peers[0].vault)
    keys = build_key_provider(cfg_a.peers[0].keys)
    options = PostgresOptions(dsn=Secret(primary, "bench"), slot=SLOT)
    progress = StreamProgress(STREAM, "postgres", "source", "b")
    shipper = Shipper(
        ShipperSettings(STREAM, "b", 1, 8 << 20, args.segment_max_age),
        WalSource(options, "b", STREAM),
        Vault(store),
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
    durable = {"dragent": Durable(), "pg_receivewal": Durable(), "pgbackrest": Durable()}
    heartbeats: list[tuple[int, float]] = []
    gauge: list[float] = []
    stop = asyncio.Event()
    first_seq = 0
    archived0 = 0

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
                durable["pgbackrest"].add(now, L.parse_wal_file_name(last)[1] + L.WAL_SEGMENT_SIZE)
            gauge.append(progress.rpo(now))
            await asyncio.sleep(0.02)

    beat_conn, poll_conn = await asyncpg.connect(primary), await asyncpg.connect(primary)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(ship())
            head = L.parse_lsn(await poll_conn.fetchval("SELECT pg_current_wal_insert_lsn()::text"))
            for _ in range(600):  # ship pgbench's initial load before measuring
                if shipper.end >= head:
                    break
                await asyncio.sleep(0.1)
            first_seq = shipper.last.seq if shipper.last else 0
            archived0 = int(await poll_conn.fetchval("SELECT archived_count FROM pg_stat_archiver"))
            tg.create_task(beat(beat_conn))
            tg.create_task(poll(poll_conn))
            started = time.time()
            bench = await _proc(
                pg.command(
                    "pgbench",
                    "-n",
                    "-R",
                    str(args.rate),
                    "-T",
                    str(args.seconds),
                    "-c",
                    "4",
                    "-j",
                    "2",
                    primary,
                )
            )
            await bench.communicate()
            await asyncio.sleep(2.0)  # let the streaming shippers catch up on the tail
            ended = time.time()
            stop.set()
        segments = (shipper.last.seq if shipper.last else 0) - first_seq
        archived = int(await poll_conn.fetchval("SELECT archived_count FROM pg_stat_archiver"))
        commit = await _commit_costs(primary, store, keys, work)
    finally:
        receivewal.terminate()
        await receivewal.wait()
        await beat_conn.close()
        await poll_conn.close()
        await keys.aclose()
        await store.aclose()
    hours = (ended - started) / 3600
    beats = [(lsn, t) for lsn, t in heartbeats if t <= ended - 2.0]
    rows: dict[str, Any] = {}
    for name, d in durable.items():
        rpo = d.rpo(beats, ended)
        requests = {"dragent": segments, "pg_receivewal": 0, "pgbackrest": archived - archived0}
        rows[name] = {
            "rpo_p50": pct(rpo, 0.5),
            "rpo_p99": pct(rpo, 0.99),
            "rpo_max": max(rpo) if rpo else float("nan"),
            "heartbeats": len(rpo),
            "object_store_requests_per_hour": round(requests[name] / hours),
        }
    rows["dragent"]["exported_rpo_gauge_p99"] = pct(gauge, 0.99)
    return {
        "seconds": args.seconds,
        "segment_max_age": args.segment_max_age,
        "rate_tps": args.rate,
        "shippers": rows,
        "commit_latency_ms": commit,
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
    lines: list[str] = []
    out = lines.append
    out(f"pgbench at {result['rate_tps']} tps for {result['seconds']} s, dragent "
          f"segment_max_age {result['segment_max_age']} s")  # fmt: skip
    out(f"{'shipper':<15}{'RPO p50 s':>11}{'p99 s':>9}{'max s':>9}{'beats':>7}{'req/hour':>11}")
    for name, r in result["shippers"].items():
        out(
            f"{name:<15}{r['rpo_p50']:>11.3f}{r['rpo_p99']:>9.3f}{r['rpo_max']:>9.3f}"
            f"{r['heartbeats']:>7}{r['object_store_requests_per_hour']:>11}"
        )
    g = result["shippers"]["dragent"].get("exported_rpo_gauge_p99")
    out(f"dragent_rpo_seconds gauge p99 over the run: {g:.3f} s")
    c = result["commit_latency_ms"]
    out(
        f"commit latency ms, async p50 {c['async_p50']} p99 {c['async_p99']}; "
        f"synchronous (zero-loss) p50 {c['sync_p50']} p99 {c['sync_p99']}"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--rate", type=int, default=200, help="pgbench transactions per second")
    parser.add_argument("--segment-max-age", type=float, default=0.2, help="seconds")
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
