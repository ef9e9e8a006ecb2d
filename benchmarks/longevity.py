"""A long history: restore time, vault bytes under a window, incremental base backups.

Usage: ``python benchmarks/longevity.py [--history-seconds 40] [--rate 100]
[--writes 15000] [--restores 7] [--scale 30] [--json] [--lab-dir DIR]``

One run on a fresh lab (real PostgreSQL 15, region a's primary; region b's
SeaweedFS vault), three measurements side by side:

1. **Restore to latest after 1x and 10x the history, the same data to replay.**
   Two in-process shippers (``WalSource`` + ``Shipper``, the agent's default
   segments: 8 MiB or 200 ms) ship the same primary into two streams of the
   vault. ``pgbench -R <rate>`` writes for ``10 x --history-seconds``; the 10x
   stream ships all of it, the 1x stream starts for its last tenth (with a base
   backup where it starts, so that the last backup of each stream is an
   incremental one). Then one base backup of each stream (both of the same
   database, a moment apart), then the same ``pgbench -t <writes> -c 2`` in both
   logs. ``restore(..., latest)`` is timed (wall time of the call: fetch and
   extract the backup, fetch the WAL, replay, start and promote; the promotion is
   polled every 0.2 s) ``--restores`` times each, alternating, after one untimed
   restore (cold caches); medians, the ratio 10x/1x (target <= 1.2) and the
   difference are reported, with the segments of each log, the segments each
   restore applied, and what each reads before the WAL (manifests, packs). The old way
   (reading the log from its first segment, before ``locate``) is measured once on
   each log as the walk it was: ``LogWalk.read()`` over the whole log against
   ``locate.first_needed`` plus the walk of the suffix it returns (fetch and verify
   only, no replay).
2. **Vault bytes with a recovery window against without.** The 10x stream has
   base backups at 0, 40 % and 80 % of its history and at its end. ``gc.collect``
   with a window starting between the 80 % backup and the last one and
   ``keep_backups = 1`` runs as a dry run (its figures: what the stream would
   hold), then for real; the stream's objects are listed before (no collection)
   and after (the real pass), and a restore to latest after the real pass proves
   the window's end still restorable.
3. **Incremental base backup against pgBackRest's.** A database of its own
   (``pgbench -i -s <scale>``); dragent backup 1 (full) and pgBackRest full
   backups; a contiguous 5 % of ``pgbench_accounts`` (by aid) updated, then
   CHECKPOINT; dragent backup 2 (incremental by content-defined chunks, the
   default settings) and pgBackRest ``--type=incr`` backups. pgBackRest as its
   users run it: ``compress-type=zst``, ``process-max=2``, ``start-fast=y``,
   ``repo-bundle=y``, WAL archived with ``archive-async``, its repository in the
   same bucket through the HTTPS front (``_pgbackrest.py``, ``_s3count.py``); a
   second repository with block incremental (``repo-block=y``: beta in 2.45,
   "do not use in production") is an extra, labelled row. Reported: the
   database's size (``pg_database_size``), what the second backup stored (dragent:
   the objects under its own prefix, and the uncompressed length of its new
   chunks; pgBackRest: ``info.repository.delta``, the repository bytes, and
   ``info.delta``, uncompressed, from ``pgbackrest info --output=json``), seconds,
   and the stored bytes as a fraction of the database (the compared figure;
   target <= 0.15 for dragent).
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
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import load_config
from agent.lab import Lab
from agent.lab.ports import free_port
from benchmarks._baseline import require
from benchmarks._pgbackrest import archive_command, run_pgbackrest, s3_repo
from benchmarks._s3count import CountingProxy
from replicators import logs
from replicators.keys import KeyProvider, build_key_provider
from replicators.logread import LogWalk
from replicators.metrics import Metrics
from replicators.postgres import gc, locate, standby
from replicators.postgres import lsn as L
from replicators.postgres import restore as restore_module
from replicators.postgres.backupchunks import parse_pack_key
from replicators.postgres.basebackup import (
    BackupManifest,
    backup_prefix,
    extract_backup,
    list_backups,
    take_backup,
)
from replicators.postgres.options import PostgresOptions
from replicators.postgres.restore import PREFETCH, RestoreResult, RestoreTarget, restore
from replicators.postgres.walsource import WalSource
from replicators.progress import StreamProgress
from replicators.s3 import S3Store
from replicators.settings import S3Config, Secret
from replicators.shipper import Shipper, ShipperSettings
from replicators.vault import Vault

STREAM_1X = "longevity-1x"
STREAM_10X = "longevity-10x"
STREAM_INCR = "longevity-incr"
STANZA = "longevity"
BENCH_DB = "bench_incr"
SEGMENT_MAX_BYTES = 8 << 20
SEGMENT_MAX_AGE = 0.2  # the agent's default (agent/config.py)
CHANGED = 0.05  # the fraction of pgbench_accounts updated between the two backups
REPOS = {1: "pgbackrest", 2: "pgbackrest_block"}


@dataclass(frozen=True)
class Window:
    """A retention policy (``retention.Policy``)."""

    window: float
    keep_backups: int = 1
    orphan_grace: float = 86400.0


@dataclass
class Shipping:
    """One stream shipped in-process from the primary into the vault, as the agent does."""

    shipper: Shipper
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @classmethod
    def start(
        cls, primary: str, stream: str, store: S3Store, keys: KeyProvider, work: Path
    ) -> Shipping:
        options = PostgresOptions(dsn=Secret(primary, "bench"), slot=stream.replace("-", "_"))
        shipper = Shipper(
            ShipperSettings(stream, "b", 1, SEGMENT_MAX_BYTES, SEGMENT_MAX_AGE),
            WalSource(options, "b", stream),
            Vault(store),
            keys,
            work / f"{stream}.shipped.json",
            StreamProgress(stream, "postgres", "source", "b"),
            Metrics(CollectorRegistry()).stream(stream, "b"),
        )
        running = cls(shipper)
        running.task = asyncio.create_task(running._loop())
        return running

    async def _loop(self) -> None:
        try:
            await self.shipper.recover()
            while not self.stop.is_set():
                if not await self.shipper.sync_once(self.stop):
                    await asyncio.sleep(0.05)
        finally:
            await self.shipper.source.aclose()

    async def caught_up(self, lsn: int, within: float = 180.0) -> None:
        """Wait until everything before ``lsn`` is in the vault."""
        until = time.monotonic() + within
        while self.shipper.end < lsn:
            assert self.task is not None
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise SystemExit(f"{self.shipper.settings.stream}: the shipper stopped")
            if time.monotonic() > until:
                raise SystemExit(f"{self.shipper.settings.stream}: not caught up in {within}s")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task


async def _run(argv: list[str]) -> str:
    """Run a program to its end; its stdout. Exits the benchmark if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv[:6])}... failed: {err.decode()[-600:]}")
    return out.decode()


async def _sql(dsn: str, *statements: str) -> Any:
    """Run ``statements``; the value of the last one."""
    conn = await asyncpg.connect(dsn)
    try:
        value = None
        for s in statements:
            value = await conn.fetchval(s)
        return value
    finally:
        await conn.close()


async def _lsn(dsn: str) -> int:
    return L.parse_lsn(str(await _sql(dsn, "SELECT pg_current_wal_insert_lsn()::text")))


def _note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _workdir() -> Path:
    work = Path(tempfile.mkdtemp(prefix="longevity-", dir="/tmp"))
    work.chmod(0o755)  # reachable by the postgres OS user (restored clusters live here)
    return work


async def run(args: argparse.Namespace) -> dict[str, Any]:
    lab_dir = Path(args.lab_dir or tempfile.mkdtemp(prefix="dragent-longevity-"))
    lab = Lab(lab_dir / "lab")
    work = _workdir()
    try:
        _note("lab up (PostgreSQL and SeaweedFS)")
        await lab.up(("postgres", "s3"))
        return await _bench(args, lab, work)
    finally:
        await lab.down(purge=not args.lab_dir)
        shutil.rmtree(work, ignore_errors=True)
        if not args.lab_dir:
            shutil.rmtree(lab_dir, ignore_errors=True)


@dataclass
class Rig:
    lab: Lab
    work: Path
    primary: str
    options: PostgresOptions
    vault_cfg: S3Config
    store: S3Store
    send: KeyProvider
    recv: KeyProvider
    clusters: list[Path] = field(default_factory=list)


async def _bench(args: argparse.Namespace, lab: Lab, work: Path) -> dict[str, Any]:
    cfg_a, cfg_b = load_config(lab.config_path("a")), load_config(lab.config_path("b"))
    vault_cfg = cfg_a.peers[0].vault
    primary = lab.pg_dsn("a")
    store = await S3Store.open(vault_cfg)
    rig = Rig(
        lab, work, primary, PostgresOptions(dsn=Secret(primary, "bench")), vault_cfg, store,
        build_key_provider(cfg_a.peers[0].keys), build_key_provider(cfg_b.keys),
    )  # fmt: skip
    try:
        history = await _history(args, rig)
        restored = await _restores(args, rig, history)
        vault = await _window(args, rig, history)
        incremental = await _incremental(args, rig)
    finally:
        for data_dir in rig.clusters:
            with contextlib.suppress(Exception):
                await standby.stop(rig.options, data_dir)
        await rig.send.aclose()
        await rig.recv.aclose()
        await store.aclose()
    detail = restored.pop("detail")  # after the figures: run_all's headline is the first ones
    return {
        "restore": restored,
        "vault": vault,
        "incremental": incremental,
        "history_seconds_1x": args.history_seconds,
        "history_seconds_10x": 10 * args.history_seconds,
        "rate_tps": args.rate,
        "writes_after_backup": 2 * args.writes,
        "segment_max_age": SEGMENT_MAX_AGE,
        "segment_max_bytes": SEGMENT_MAX_BYTES,
        "scale": args.scale,
        "restore_detail": detail,
    }


async def _history(args: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    """Ship ``10 x history`` into the 10x stream and its last tenth into the 1x stream,
    with the 10x stream's backups at 0, 40 % and 80 %; then a backup of each and the
    same writes in both logs."""
    pg = rig.lab.postgres("a")
    await _run(pg.command("pgbench", "-i", "-s", "1", "-q", rig.primary))
    ten = Shipping.start(rig.primary, STREAM_10X, rig.store, rig.send, rig.work)
    one: Shipping | None = None
    try:
        await ten.caught_up(await _lsn(rig.primary))
        seconds = 10 * args.history_seconds
        _note(f"history: pgbench -R {args.rate} for {seconds}s, the 10x stream shipping")
        started = time.monotonic()
        load = asyncio.create_task(
            _run(
                pg.command(
                    "pgbench", "-n", "-R", str(args.rate), "-T", str(seconds),
                    "-c", "2", "-j", "1", rig.primary,
                )
            )
        )  # fmt: skip
        marks: list[BackupManifest] = []
        for at in (0.0, 0.4, 0.8):
            await asyncio.sleep(max(0.0, started + at * seconds - time.monotonic()))
            marks.append(await take_backup(rig.options, STREAM_10X, rig.store, rig.send))
            _note(f"10x stream: backup at {at:.0%} of the history ({marks[-1].id})")
        await asyncio.sleep(max(0.0, started + 0.9 * seconds - time.monotonic()))
        one = Shipping.start(rig.primary, STREAM_1X, rig.store, rig.send, rig.work)
        # a backup where its log begins, so that both streams' last backups are incremental
        await take_backup(rig.options, STREAM_1X, rig.store, rig.send)
        _note("1x stream shipping for the last tenth, a backup at its start")
        await load
        end = await _lsn(rig.primary)
        await ten.caught_up(end)
        await one.caught_up(end)
        last_10x = await take_backup(rig.options, STREAM_10X, rig.store, rig.send)
        last_1x = await take_backup(rig.options, STREAM_1X, rig.store, rig.send)
        _note(f"backups of both streams taken; pgbench -t {args.writes} -c 2 in both logs")
        await _run(
            pg.command("pgbench", "-n", "-t", str(args.writes), "-c", "2", "-j", "1", rig.primary)
        )
        end = await _lsn(rig.primary)
        await ten.caught_up(end)
        await one.caught_up(end)
        rows = int(await _sql(rig.primary, "SELECT count(*) FROM pgbench_history"))
    finally:
        await ten.close()
        if one is not None:
            await one.close()
    for stream in (STREAM_10X, STREAM_1X):  # no slot may hold the primary's WAL from here
        slot = stream.replace("-", "_")
        await _sql(rig.primary, f"SELECT pg_drop_replication_slot('{slot}')")
    return {
        "marks": marks,
        "backups": {STREAM_1X: last_1x, STREAM_10X: last_10x},
        "end": end,
        "rows": rows,
    }


@dataclass
class Restored:
    seconds: float
    result: RestoreResult
    rows: int
    phases: dict[str, float]


PHASES = ("list_backups", "extract_backup", "first_needed", "fill_spool")


@contextlib.contextmanager
def _timed_phases(into: dict[str, float]) -> Iterator[None]:
    """Time the steps ``restore()`` takes by wrapping, for the length of one call, the
    functions it calls by name: ``list_backups``, ``extract_backup`` and ``fill_spool``
    in the restore module, ``first_needed`` in ``locate`` (a benchmark's probe: nothing
    they do changes). ``into`` gets each one's seconds and ``fill_spool_end``, when
    the WAL fetch finished, from the call's start."""
    originals = {name: getattr(restore_module, name) for name in PHASES if name != "first_needed"}
    originals["first_needed"] = locate.first_needed
    started = time.perf_counter()

    def wrap(name: str) -> Callable[..., Awaitable[Any]]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return await originals[name](*args, **kwargs)
            finally:
                into[name] = into.get(name, 0.0) + time.perf_counter() - t
                into[f"{name}_end"] = time.perf_counter() - started

        return timed

    for name in PHASES:
        setattr(locate if name == "first_needed" else restore_module, name, wrap(name))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(locate if name == "first_needed" else restore_module, name, function)


async def _restore_once(rig: Rig, stream: str, n: int) -> Restored:
    """One restore to latest, timed, with its steps; the restored cluster's
    pgbench_history rows."""
    data_dir = rig.work / f"restore-{n}"
    port = free_port()
    rig.clusters.append(data_dir)
    phases: dict[str, float] = {}
    started = time.perf_counter()
    with _timed_phases(phases):
        result = await restore(
            rig.options, stream, rig.store, rig.recv,
            target=RestoreTarget(), data_dir=data_dir, port=port,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    steps = {name: round(phases.get(name, 0.0), 3) for name in PHASES}
    # from the end of the WAL fetch to the promotion: the replay left, promotion, polling
    steps["promoted_after_fill"] = round(seconds - phases.get("fill_spool_end", 0.0), 3)
    try:
        dsn = f"postgresql://dragent@127.0.0.1:{port}/app"
        rows = int(await _sql(dsn, "SELECT count(*) FROM pgbench_history"))
    finally:
        await standby.stop(rig.options, data_dir)
        rig.clusters.remove(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
    return Restored(seconds, result, rows, steps)


async def _walk(rig: Rig, stream: str, start_lsn: int | None) -> dict[str, Any]:
    """Fetch and verify the log as a restore reads it: the whole log (``start_lsn`` None,
    the old way) or from ``locate.first_needed`` on (the probes timed with it)."""
    vault = Vault(rig.store)
    walk = LogWalk(vault, rig.recv, stream)
    started = time.perf_counter()
    refs, probes = None, 0
    if start_lsn is not None:
        found = await locate.first_needed(vault, rig.recv, stream, start_lsn)
        refs, probes = found.suffix, found.probes
    segments = 0
    async with contextlib.aclosing(walk.read(refs, prefetch=PREFETCH)) as reads:
        async for _ in reads:
            segments += 1
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "segments": segments,
        "bytes": walk.bytes,
        "probes": probes,
    }


async def _restores(args: argparse.Namespace, rig: Rig, history: dict[str, Any]) -> dict[str, Any]:
    vault = Vault(rig.store)
    logs = {s: len(await locate.log_refs(vault, s)) for s in (STREAM_1X, STREAM_10X)}
    times: dict[str, list[float]] = {STREAM_1X: [], STREAM_10X: []}
    applied: dict[str, list[int]] = {STREAM_1X: [], STREAM_10X: []}
    steps: dict[str, list[dict[str, float]]] = {STREAM_1X: [], STREAM_10X: []}
    # one restore untimed first: no variant pays for the first run's cold caches
    rows_ok = (await _restore_once(rig, STREAM_1X, 0)).rows == history["rows"]
    n = 0
    for i in range(args.restores):
        order = (STREAM_1X, STREAM_10X) if i % 2 == 0 else (STREAM_10X, STREAM_1X)
        for stream in order:
            n += 1
            done = await _restore_once(rig, stream, n)
            times[stream].append(round(done.seconds, 3))
            applied[stream].append(done.result.segments)
            steps[stream].append(done.phases)
            rows_ok = rows_ok and done.rows == history["rows"]
            _note(
                f"restore {stream} to latest: {done.seconds:.2f}s, "
                f"{done.result.segments} segments, {done.phases}"
            )
    walks, backups = {}, {}
    for label, stream in (("1x", STREAM_1X), ("10x", STREAM_10X)):
        backup: BackupManifest = history["backups"][stream]
        walks[f"whole_log_{label}"] = await _walk(rig, stream, None)
        walks[f"needed_suffix_{label}"] = await _walk(rig, stream, backup.start_lsn)
        backups[label] = await _backup_cost(rig, stream, backup)
    for i in range(args.restores):  # the backup's part of a restore, alternating
        order = ("1x", "10x") if i % 2 == 0 else ("10x", "1x")
        for label in order:
            stream = STREAM_1X if label == "1x" else STREAM_10X
            seconds = await _extract_once(rig, history["backups"][stream], i)
            backups[label].setdefault("extract_runs_seconds", []).append(seconds)
    for b in backups.values():
        b["extract_median_seconds"] = statistics.median(b["extract_runs_seconds"])
    _note(f"walks: {walks}")
    one, ten = statistics.median(times[STREAM_1X]), statistics.median(times[STREAM_10X])
    b1, b10 = history["backups"][STREAM_1X], history["backups"][STREAM_10X]
    medians = {
        label: {k: round(statistics.median(r[k] for r in steps[s]), 3) for k in steps[s][0]}
        for label, s in (("1x", STREAM_1X), ("10x", STREAM_10X))
    }
    return {
        "latest_1x_seconds": round(one, 3),
        "latest_10x_seconds": round(ten, 3),
        "ratio": round(ten / one, 3),
        "latest_10x_minus_1x_seconds": round(ten - one, 3),
        "old_way_walk_10x_seconds": walks["whole_log_10x"]["seconds"],
        "new_way_walk_10x_seconds": walks["needed_suffix_10x"]["seconds"],
        "target": "ratio <= 1.2",
        "log_segments_1x": logs[STREAM_1X],
        "log_segments_10x": logs[STREAM_10X],
        "segments_read_1x": applied[STREAM_1X],
        "segments_read_10x": applied[STREAM_10X],
        "runs_1x_seconds": times[STREAM_1X],
        "runs_10x_seconds": times[STREAM_10X],
        "backup_bytes_1x": b1.bytes,
        "backup_bytes_10x": b10.bytes,
        "restored_rows_match_primary": rows_ok,
        "detail": {"steps_median": medians, "walks": walks, "backups": backups},
    }


async def _extract_once(rig: Rig, backup: BackupManifest, n: int) -> float:
    """Fetch, verify and untar ``backup`` and run pg_verifybackup (a restore's first
    step), timed; the directory is removed after."""
    data_dir = rig.work / f"extract-{n}"
    started = time.perf_counter()
    try:
        await extract_backup(rig.options, rig.store, rig.recv, backup, data_dir)
        return round(time.perf_counter() - started, 3)
    finally:
        await asyncio.to_thread(shutil.rmtree, data_dir, True)


async def _backup_cost(rig: Rig, stream: str, backup: BackupManifest) -> dict[str, Any]:
    """What a restore from ``backup`` reads before any WAL: every manifest of the stream
    (``list_backups``, timed), and the packs the backup's chunks lie in, whole, in
    whichever earlier backups' prefixes they are."""
    started = time.perf_counter()
    manifests = await list_backups(rig.store, rig.recv, stream)
    return {
        "list_backups_seconds": round(time.perf_counter() - started, 3),
        "manifests": len(manifests),
        "packs": len(backup.parts),
        "pack_bytes": sum(int(p.get("stored", 0)) for p in backup.parts),
        "pack_prefixes": len({parse_pack_key(p["key"])[1] for p in backup.parts}),
        "tar_bytes": backup.bytes,
    }


async def _footprint(store: S3Store, stream: str) -> dict[str, int]:
    """Bytes and objects the stream holds in the vault: its segments and its backups."""
    out = {"segment_bytes": 0, "segment_objects": 0, "backup_bytes": 0, "backup_objects": 0}
    for kind, prefix in (("segment", f"streams/{stream}/"), ("backup", backup_prefix(stream))):
        async for info in store.list(prefix):
            out[f"{kind}_bytes"] += info.size
            out[f"{kind}_objects"] += 1
    return out


async def _window(args: argparse.Namespace, rig: Rig, history: dict[str, Any]) -> dict[str, Any]:
    """The 10x stream's vault with no collection, under the window (dry run), after the
    real pass; and a restore to latest after it."""
    before = await _footprint(rig.store, STREAM_10X)
    eighty: BackupManifest = history["marks"][2]
    last: BackupManifest = history["backups"][STREAM_10X]
    now = time.time()
    policy = Window(window=now - (eighty.end_time + last.start_time) / 2)
    dry = await gc.collect(rig.store, rig.recv, STREAM_10X, policy, dry_run=True, now=now)
    real = await gc.collect(rig.store, rig.recv, STREAM_10X, policy, now=now)
    after = await _footprint(rig.store, STREAM_10X)
    done = await _restore_once(rig, STREAM_10X, 1000)
    seconds, result, rows = done.seconds, done.result, done.rows
    _note(f"gc: {before} -> {after}; restore after it {seconds:.2f}s")
    without = before["segment_bytes"] + before["backup_bytes"]
    with_window = sum(dry.vault_bytes.values())
    history_span = last.end_time - history["marks"][0].start_time
    return {
        "bytes_without_window": without,
        "objects_without_window": before["segment_objects"] + before["backup_objects"],
        "bytes_with_window": with_window,
        "objects_with_window": sum(dry.vault_objects.values()),
        "with_window_ratio": round(with_window / without, 4),
        "figures_from": "gc.collect dry run; the real pass after it, listed",
        "bytes_after_real_gc": after["segment_bytes"] + after["backup_bytes"],
        "objects_after_real_gc": after["segment_objects"] + after["backup_objects"],
        "dry_run_matches_real_pass": (
            dry.deleted == real.deleted
            and with_window == after["segment_bytes"] + after["backup_bytes"]
        ),
        "window": round(policy.window, 1),
        "window_fraction_of_history": round(policy.window / history_span, 3),
        "keep_backups": policy.keep_backups,
        "backups_before": 4,
        "kept_backups": len(dry.kept_backups),
        "deleted": dry.deleted,
        "recovery_window_after_pass": round(real.recovery_window, 1),
        "by_kind_without": before,
        "by_kind_with": {
            **{f"{k}_bytes": v for k, v in dry.vault_bytes.items()},
            **{f"{k}_objects": v for k, v in dry.vault_objects.items()},
        },
        "restore_latest_after_gc_seconds": round(seconds, 3),
        "restore_after_gc_rows_match": rows == history["rows"],
        "restore_after_gc_segments": result.segments,
    }


async def _setup_pgbackrest(rig: Rig, proxy: CountingProxy) -> Path:
    """One stanza, two repositories in the vault's bucket through the HTTPS front:
    repo1 file-level incremental (pgBackRest's production setting), repo2 with block
    incremental (beta in 2.45); WAL archived to both with archive-async. Archiving
    starts now (a restart: archive_mode)."""
    pg = rig.lab.postgres("a")
    home = rig.work / "pgbackrest"
    home.mkdir()
    shutil.chown(home, "postgres", "postgres")
    creds = rig.lab.s3_credentials
    conf = rig.work / "pgbackrest.conf"
    conf.write_text(
        "[global]\n"
        + s3_repo(1, proxy.port, rig.vault_cfg, creds, "pgbackrest-longevity")
        + "repo1-retention-full=2\nrepo1-bundle=y\n"
        + s3_repo(2, proxy.port, rig.vault_cfg, creds, "pgbackrest-longevity-block")
        + "repo2-retention-full=2\nrepo2-bundle=y\nrepo2-block=y\nbeta=y\n"
        "compress-type=zst\nprocess-max=2\nstart-fast=y\n"
        f"archive-async=y\nspool-path={home}\n"
        f"log-level-console=warn\nlog-level-file=warn\nlog-path={home}\nlock-path={home}\n"
        f"[{STANZA}]\npg1-path={pg.data_dir}\npg1-port={pg.port}\n"
        f"pg1-socket-path={pg.socket_dir}\n"
    )
    conf.chmod(0o644)
    await _sql(
        rig.primary,
        "ALTER SYSTEM SET archive_mode = on",
        f"ALTER SYSTEM SET archive_command = '{archive_command(conf, STANZA)}'",
    )
    await rig.lab.fault("a", "postgres", "restart")
    await run_pgbackrest(conf, STANZA, "stanza-create")
    return conf


async def _pgbackrest_backup(conf: Path, repo: int, kind: str) -> float:
    started = time.perf_counter()
    await run_pgbackrest(conf, STANZA, "backup", f"--repo={repo}", f"--type={kind}")
    return time.perf_counter() - started


async def _pgbackrest_last(conf: Path, repo: int) -> dict[str, Any]:
    """The newest backup of ``repo`` in ``pgbackrest info --output=json``."""
    info = json.loads(await run_pgbackrest(conf, STANZA, "info", "--output=json"))
    backups = [b for b in info[0]["backup"] if b["database"]["repo-key"] == repo]
    return dict(backups[-1])


async def _incremental(args: argparse.Namespace, rig: Rig) -> dict[str, Any]:
    pg = rig.lab.postgres("a")
    dsn = rig.lab.pg_dsn("a", BENCH_DB)
    await _sql(rig.primary, f"CREATE DATABASE {BENCH_DB}")
    _note(f"pgbench -i -s {args.scale} into {BENCH_DB}")
    await _run(pg.command("pgbench", "-i", "-s", str(args.scale), "-q", dsn))
    await _sql(dsn, "CHECKPOINT")
    proxy = CountingProxy(rig.vault_cfg.endpoint or "")
    proxy.start()
    try:
        conf = await _setup_pgbackrest(rig, proxy)
        db_bytes = int(await _sql(dsn, f"SELECT pg_database_size('{BENCH_DB}')"))
        cluster_bytes = int(await _sql(dsn, "SELECT sum(pg_database_size(oid)) FROM pg_database"))
        seconds: dict[str, list[float]] = {name: [] for name in ("dragent", *REPOS.values())}
        manifests: list[BackupManifest] = []
        pgbr: dict[str, dict[str, Any]] = {}
        for step in ("full", "incr"):
            if step == "incr":
                rows = args.scale * 100000
                lo = int(rows * 0.4)
                hi = lo + int(rows * CHANGED)
                _note(f"UPDATE pgbench_accounts aid {lo + 1}..{hi} ({CHANGED:.0%}); CHECKPOINT")
                await _sql(
                    dsn,
                    "UPDATE pgbench_accounts SET abalance = abalance + 1 "
                    f"WHERE aid > {lo} AND aid <= {hi}",
                    "CHECKPOINT",
                )
            started = time.perf_counter()
            manifests.append(await take_backup(rig.options, STREAM_INCR, rig.store, rig.send))
            seconds["dragent"].append(time.perf_counter() - started)
            _note(f"dragent backup {len(manifests)}: {seconds['dragent'][-1]:.1f}s")
            for repo, name in REPOS.items():
                seconds[name].append(await _pgbackrest_backup(conf, repo, step))
                _note(f"{name} {step}: {seconds[name][-1]:.1f}s")
                if step == "incr":
                    pgbr[name] = await _pgbackrest_last(conf, repo)
    finally:
        proxy.stop()
    first, second = manifests
    own = backup_prefix(STREAM_INCR, second.id)
    stored = sum([i.size async for i in rig.store.list(own)])
    new_raw = sum(c.length for c in second.chunks if second.parts[c.pack]["key"].startswith(own))
    tools: dict[str, dict[str, Any]] = {
        "dragent": {
            "second_bytes": stored,
            "ratio": round(stored / db_bytes, 4),
            "second_seconds": round(seconds["dragent"][1], 2),
            "first_seconds": round(seconds["dragent"][0], 2),
            "second_uncompressed_bytes": new_raw,
            "second_uncompressed_fraction": round(new_raw / db_bytes, 4),
            "first_bytes": first.stored,
            "backup_bytes": second.bytes,
        }
    }
    for name, b in pgbr.items():
        repo_delta = int(b["info"]["repository"]["delta"])
        delta = int(b["info"]["delta"])
        tools[name] = {
            "second_bytes": repo_delta,
            "ratio": round(repo_delta / db_bytes, 4),
            "second_seconds": round(seconds[name][1], 2),
            "first_seconds": round(seconds[name][0], 2),
            "second_uncompressed_bytes": delta,
            "second_uncompressed_fraction": round(delta / db_bytes, 4),
            "backup_bytes": int(b["info"]["size"]),
            "label": b["label"],
        }
    out: dict[str, Any] = {f"{name}_ratio": t["ratio"] for name, t in tools.items()}
    out |= {f"{name}_second_seconds": t["second_seconds"] for name, t in tools.items()}
    out |= {f"{name}_second_bytes": t["second_bytes"] for name, t in tools.items()}
    out |= {
        "database_bytes": db_bytes,
        "cluster_bytes": cluster_bytes,
        "changed_fraction_of_rows": CHANGED,
        "compared": "bytes the second backup stored in the repository / database_bytes",
        "target": "dragent_ratio <= 0.15",
        "uncompressed": "dragent: the new chunks' length; pgBackRest: info.delta (whole "
        "files, also with repo-block)",
        "pgbackrest_block_note": "repo-block=y (block incremental) is beta in pgBackRest 2.45",
        "by_tool": tools,
    }
    return out


def table(result: dict[str, Any]) -> str:
    r, v, i = result["restore"], result["vault"], result["incremental"]
    d = result["restore_detail"]
    walks = d["walks"]
    mb = 1e6
    lines = [
        f"history: pgbench -R {result['rate_tps']} for {result['history_seconds_1x']} s (1x) "
        f"and {result['history_seconds_10x']} s (10x); then a base backup and "
        f"{result['writes_after_backup']} transactions; segments {SEGMENT_MAX_AGE:g} s / "
        f"{SEGMENT_MAX_BYTES >> 20} MiB",
        "",
        "1. restore to latest (median of "
        f"{len(r['runs_1x_seconds'])}; wall time of restore(), start and promotion included)",
        f"{'':<6}{'log segments':>14}{'read':>8}{'median s':>10}   runs s",
        f"{'1x':<6}{r['log_segments_1x']:>14}{r['segments_read_1x'][0]:>8}"
        f"{r['latest_1x_seconds']:>10.2f}   {r['runs_1x_seconds']}",
        f"{'10x':<6}{r['log_segments_10x']:>14}{r['segments_read_10x'][0]:>8}"
        f"{r['latest_10x_seconds']:>10.2f}   {r['runs_10x_seconds']}",
        f"ratio 10x/1x {r['ratio']:.3f} ({r['target']}), 10x - 1x "
        f"{r['latest_10x_minus_1x_seconds']:+.2f} s; restored rows match the primary: "
        f"{r['restored_rows_match_primary']}",
        "steps inside restore() (medians, s; first_needed is inside fill_spool): "
        + ", ".join(f"{k}" for k in d["steps_median"]["1x"]),
    ]
    for label in ("1x", "10x"):
        steps = d["steps_median"][label]
        lines.append(f"  {label:<4} " + "  ".join(f"{x:.3f}" for x in steps.values()))
    lines.append(
        "fetch + verify of the log (no replay): whole log (before locate) vs needed suffix"
    )
    for label in ("1x", "10x"):
        w, s = walks[f"whole_log_{label}"], walks[f"needed_suffix_{label}"]
        lines.append(
            f"  {label:<4} whole {w['segments']:>5} segments {w['seconds']:>8.2f} s "
            f"{w['bytes'] / mb:>8.1f} MB | suffix {s['segments']:>4} segments "
            f"{s['seconds']:>6.2f} s {s['bytes'] / mb:>5.1f} MB ({s['probes']} probes)"
        )
    lines.append("what each restore reads before the WAL: manifests, and the backup's packs whole")
    for label in ("1x", "10x"):
        b = d["backups"][label]
        lines.append(
            f"  {label:<4} {b['manifests']} manifests ({b['list_backups_seconds']:.3f} s), "
            f"{b['packs']} packs {b['pack_bytes'] / mb:.1f} MB in {b['pack_prefixes']} "
            f"backups' prefixes, tar {b['tar_bytes'] / mb:.1f} MB; extract + "
            f"pg_verifybackup {b['extract_median_seconds']:.2f} s (median)"
        )
    lines += [
        "",
        f"2. vault of the 10x stream ({v['backups_before']} backups), window "
        f"{v['window']:g} s ({v['window_fraction_of_history']:.0%} of the history), "
        f"keep_backups {v['keep_backups']}; figures: {v['figures_from']}",
        f"  without window {v['bytes_without_window'] / mb:>9.1f} MB "
        f"{v['objects_without_window']:>6} objects",
        f"  with window    {v['bytes_with_window'] / mb:>9.1f} MB "
        f"{v['objects_with_window']:>6} objects ({v['with_window_ratio']:.1%}); after the real "
        f"pass {v['bytes_after_real_gc'] / mb:.1f} MB (dry run matches: "
        f"{v['dry_run_matches_real_pass']}); recovery window after it "
        f"{v['recovery_window_after_pass']:g} s",
        f"  restore to latest after the pass {v['restore_latest_after_gc_seconds']:.2f} s, rows "
        f"match: {v['restore_after_gc_rows_match']}",
        "",
        f"3. second base backup after {i['changed_fraction_of_rows']:.0%} of pgbench_accounts "
        f"changed; database {i['database_bytes'] / mb:.1f} MB "
        f"(cluster {i['cluster_bytes'] / mb:.1f} MB); compared: {i['compared']}",
        f"{'':<34}{'stored MB':>10}{'ratio':>8}{'uncompr. MB':>12}{'frac.':>8}"
        f"{'2nd s':>8}{'1st s':>8}",
    ]
    labels = {
        "dragent": "dragent (FastCDC chunks)",
        "pgbackrest": "pgBackRest incr (file-level)",
        "pgbackrest_block": "pgBackRest incr, repo-block (beta)",
    }
    for name, t in i["by_tool"].items():
        lines.append(
            f"{labels.get(name, name):<34}{t['second_bytes'] / mb:>10.2f}{t['ratio']:>8.3f}"
            f"{t['second_uncompressed_bytes'] / mb:>12.2f}"
            f"{t['second_uncompressed_fraction']:>8.3f}"
            f"{t['second_seconds']:>8.1f}{t['first_seconds']:>8.1f}"
        )
    lines.append(f"uncompressed: {i['uncompressed']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--history-seconds", type=int, default=40, help="the 1x history (10x: ten times as long)"
    )
    parser.add_argument("--rate", type=int, default=100, help="pgbench tps of the history")
    parser.add_argument(
        "--writes", type=int, default=15000, help="pgbench transactions per client after the backup"
    )
    parser.add_argument("--restores", type=int, default=7, help="timed restores per variant")
    parser.add_argument("--scale", type=int, default=30, help="pgbench scale of the backup test")
    parser.add_argument("--lab-dir", help="use (and keep) this lab directory")
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    args = parser.parse_args()
    require("pgbackrest")
    logs.configure("logfmt", "warning")  # stdout is the JSON's
    result = asyncio.run(run(args))
    if args.json:
        print(table(result), file=sys.stderr)
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
