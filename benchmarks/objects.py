"""Object replication against ``rclone sync`` on the same data and store, and the
Merkle comparison of 100,000 keys.

Usage: ``python benchmarks/objects.py [--json] [--objects N] [--latency-objects K]
[--lab-dir DIR] [--merkle-keys M]``

In a lab (started for the run unless ``--lab-dir`` names a running one), from
region a's ``data`` bucket to region b's, through b's vault, shipper and sink
in this process:

- latency: with the filer subscription on (event-driven), ``K`` small objects
  are written one by one (about 20/s); latency is from the end of each PUT at
  the source to the end of its PUT in the mirror; p50/p99.
- throughput: ``N`` objects of mixed sizes (90 % 4–64 KiB, 10 % 256 KiB–1 MiB,
  plus two of 20 MiB) are written first, then replicated from a cold start
  (the start-up scan): objects/s and MB/s until the last is in the mirror.
- rclone: ``rclone sync`` of the same ``N`` objects from the same source
  bucket to another prefix of the same mirror bucket (16 transfers and
  checkers), timed the same way; then one object is changed and one more sync
  is timed: the least latency a periodic sync can offer.
- Merkle: two key trees of ``M`` keys (default 100,000) differing in 10 keys,
  built and compared in a child process; time and peak RSS.

``--json`` prints the figures as JSON on stdout and the table on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry

from agent.config import load_config
from agent.lab import Lab
from agent.lab.stream_rig import running_pair
from benchmarks._baseline import require
from benchmarks._rss import peak_rss_mb
from replicators.bucket import Bucket, find_weed_binary
from replicators.keys import build_key_provider
from replicators.metrics import Metrics
from replicators.objects import records as rec
from replicators.objects.mirror import MirrorTarget
from replicators.objects.options import ObjectsOptions
from replicators.objects.source import ObjectsSource
from replicators.s3 import S3Store

MIB = 1 << 20


def s3(lab: Lab, region: str, prefix: str) -> dict[str, Any]:
    creds = lab.s3_credentials
    return {
        "endpoint": lab.s3_endpoint(region),
        "bucket": "data",
        "prefix": prefix,
        "addressing_style": "path",
        "access_key": f"file:{creds.access_key_file}",
        "secret_key": f"file:{creds.secret_key_file}",
    }


def options(lab: Lab, prefix: str, events: bool) -> ObjectsOptions:
    table: dict[str, Any] = {"source": s3(lab, "a", prefix), "mirror": s3(lab, "b", prefix)}
    if events:
        filer = f"127.0.0.1:{lab.port('a', 'filer')}.{lab.port('a', 'filer_grpc')}"
        table |= {"events": "filer", "filer": {"filer": filer, "weed": find_weed_binary()}}
    return ObjectsOptions.model_validate(table | {"scan_interval": 600, "inline_max": "1MiB"})


class Recorder(MirrorTarget):
    """The mirror target, noting when each key's last record was applied."""

    applied: dict[str, float]

    async def apply_record(self, record: rec.Record, where: tuple[str, int] | None = None) -> None:
        await super().apply_record(record, where)
        if not isinstance(record, rec.Part) or record.last:
            self.applied[record.key] = time.monotonic()


@contextlib.asynccontextmanager
async def replicating(
    lab: Lab, opts: ObjectsOptions, name: str, workdir: Path, in_flight: int = 4
) -> AsyncIterator[tuple[ObjectsSource, Recorder]]:
    """Shipper and sink of one objects stream in this process; ``in_flight``: segment PUTs
    pipelined (an objects stream's default, ``StreamConfig.in_flight``)."""
    cfg_a, cfg_b = load_config(lab.config_path("a")), load_config(lab.config_path("b"))
    metrics = Metrics(CollectorRegistry())
    async with contextlib.AsyncExitStack() as stack:
        peer = cfg_a.peers[0]
        store = await S3Store.open(peer.vault)
        stack.push_async_callback(store.aclose)
        send, recv = build_key_provider(peer.keys), build_key_provider(cfg_b.keys)
        stack.push_async_callback(send.aclose)
        stack.push_async_callback(recv.aclose)
        source = ObjectsSource(opts, await Bucket.open(opts.source), workdir / "src")
        stack.push_async_callback(source.aclose)
        target = Recorder(await Bucket.open(opts.mirror), workdir / "dst")
        target.applied = {}
        stack.push_async_callback(target.aclose)
        pair = running_pair(
            name, "objects", source, target, store, (send, recv), workdir, metrics=metrics,
            in_flight=in_flight,
        )  # fmt: skip
        async with pair:
            yield source, target


async def wait_for(check: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done within {within:g}s")
        await asyncio.sleep(0.02)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(lab: Lab, k: int, workdir: Path) -> dict[str, Any]:
    prefix = f"bench-lat-{time.time_ns() % 10**9}/"
    opts = options(lab, prefix, events=True)
    src = await Bucket.open(opts.source)
    written: dict[str, float] = {}
    try:
        async with replicating(lab, opts, prefix.strip("/"), workdir / "lat") as (source, target):
            await wait_for(lambda: source.scanner.scans >= 1, 60)
            await asyncio.sleep(1.0)  # the subscription is connected
            for i in range(k):
                key = f"o/{i:05d}"
                await src.write(key, os.urandom(random.randint(1024, 65536)), "", {})
                written[key] = time.monotonic()
                await asyncio.sleep(0.05)
            await wait_for(lambda: all(key in target.applied for key in written), 120)
    finally:
        await src.aclose()
    lat = [target.applied[key] - t for key, t in written.items()]
    return {
        "objects": k,
        "p50_s": round(statistics.median(lat), 3),
        "p99_s": round(pct(lat, 0.99), 3),
        "max_s": round(max(lat), 3),
    }


async def write_dataset(bucket: Bucket, n: int) -> tuple[list[str], int]:
    rng = random.Random(7)
    sizes = [
        rng.randint(4096, 65536) if rng.random() < 0.9 else rng.randint(256 * 1024, MIB)
        for _ in range(n)
    ]
    keys = [f"d/{i:06d}" for i in range(n)] + ["big/0", "big/1"]
    sizes += [20 * MIB, 20 * MIB]
    sem = asyncio.Semaphore(16)

    async def put(key: str, size: int) -> None:
        async with sem:
            await bucket.write(key, os.urandom(size), "application/octet-stream", {"b": "1"})

    async with asyncio.TaskGroup() as tg:
        for key, size in zip(keys, sizes, strict=True):
            tg.create_task(put(key, size))
    return keys, sum(sizes)


async def throughput(lab: Lab, n: int, workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    prefix = f"bench-tp-{time.time_ns() % 10**9}/"
    opts = options(lab, prefix, events=False)
    src = await Bucket.open(opts.source)
    try:
        keys, total = await write_dataset(src, n)
        started = time.monotonic()
        async with replicating(lab, opts, prefix.strip("/"), workdir / "tp") as (_, target):
            await wait_for(lambda: len(target.applied) >= len(keys), 1800)
            took = time.monotonic() - started
        ours = _rate(len(keys), total, took)
        theirs = rclone(lab, prefix, total, len(keys), workdir)
        await src.write("d/000000", b"changed", "", {})
        theirs["incremental_sync_s"] = round(rclone_sync(lab, prefix, workdir), 3)
    finally:
        await src.aclose()
    return ours, theirs


def _rate(objects: int, total: int, seconds: float) -> dict[str, Any]:
    return {
        "objects": objects,
        "bytes": total,
        "seconds": round(seconds, 2),
        "objects_per_s": round(objects / seconds, 1),
        "mb_per_s": round(total / seconds / 1e6, 1),
    }


def _rclone_env(lab: Lab) -> dict[str, str]:
    creds = lab.s3_credentials
    # rclone's S3 backend refuses a custom CA bundle on its HTTP transport (the lab is plain HTTP)
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    for name, region in (("SRC", "a"), ("DST", "b")):
        env |= {
            f"RCLONE_CONFIG_{name}_TYPE": "s3",
            f"RCLONE_CONFIG_{name}_PROVIDER": "SeaweedFS",
            f"RCLONE_CONFIG_{name}_ENDPOINT": lab.s3_endpoint(region),
            f"RCLONE_CONFIG_{name}_ACCESS_KEY_ID": creds.access_key,
            f"RCLONE_CONFIG_{name}_SECRET_ACCESS_KEY": creds.secret_key,
        }
    return env


def rclone_sync(lab: Lab, prefix: str, workdir: Path) -> float:
    started = time.monotonic()
    subprocess.run(
        [
            "rclone",
            "sync",
            f"src:data/{prefix}",
            f"dst:data/rclone-{prefix}",
            "--transfers=16",
            "--checkers=16",
            "--config=/dev/null",
        ],
        env=_rclone_env(lab),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def rclone(lab: Lab, prefix: str, total: int, objects: int, workdir: Path) -> dict[str, Any]:
    require("rclone")
    return _rate(objects, total, rclone_sync(lab, prefix, workdir))


def merkle(keys: int, differences: int) -> dict[str, Any]:
    from verifiers.objects import KeyTree, compare

    started = time.monotonic()
    a, b = KeyTree(), KeyTree()
    for i in range(keys):
        key, size, digest = f"datasets/part-{i:08d}.parquet", 1000 + i, f"{i:032x}"
        a.put(key, size, digest)
        b.put(key, size, digest)
    step = keys // differences
    for i in range(0, keys, step)[:differences]:
        b.put(f"datasets/part-{i:08d}.parquet", 1, "f" * 32)
    a.root(), b.root()
    built = time.monotonic() - started
    started = time.monotonic()
    found = compare(a, b)
    compared = time.monotonic() - started
    return {
        "keys": keys,
        "differences": len(found.keys),
        "build_both_s": round(built, 2),
        "compare_s": round(compared, 4),
        "nodes_compared": found.nodes_compared,
        "total_s": round(built + compared, 2),
        "peak_rss_mb": peak_rss_mb(),
    }


def merkle_in_child(keys: int) -> dict[str, Any]:
    child = subprocess.run(
        [sys.executable, __file__, "--merkle-only", "--merkle-keys", str(keys)],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(child.stdout))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    root = Path(args.lab_dir) if args.lab_dir else Path(tempfile.mkdtemp(prefix="bench-objects-"))
    lab = Lab(root)
    await lab.up()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out["latency"] = await latency(lab, args.latency_objects, Path(tmp))
            out["ours"], out["rclone"] = await throughput(lab, args.objects, Path(tmp))
    finally:
        if not args.lab_dir:
            await lab.down(purge=True)
    out["host"] = {"cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 1)}
    return out


def table(res: dict[str, Any]) -> str:
    lat, ours, rc, m = res["latency"], res["ours"], res["rclone"], res["merkle"]
    rows = [
        "objects replication (region a -> vault b -> mirror b), SeaweedFS lab",
        f"{'':28}{'dragent':>14}{'rclone sync':>14}",
        f"{'throughput objects/s':28}{ours['objects_per_s']:>14}{rc.get('objects_per_s', '-'):>14}",
        f"{'throughput MB/s':28}{ours['mb_per_s']:>14}{rc.get('mb_per_s', '-'):>14}",
        f"{'time for the data set (s)':28}{ours['seconds']:>14}{rc.get('seconds', '-'):>14}",
        f"{'latency p50 (s)':28}{lat['p50_s']:>14}{'-':>14}",
        f"{'latency p99 (s)':28}{lat['p99_s']:>14}{'-':>14}",
        f"{'one incremental sync (s)':28}{'-':>14}{rc.get('incremental_sync_s', '-'):>14}",
        f"data set: {ours['objects']} objects, {ours['bytes'] / 1e6:.0f} MB; "
        f"latency: {lat['objects']} objects, event-driven",
        "",
        f"Merkle: {m['keys']} keys, {m['differences']} differences found; build both "
        f"{m['build_both_s']} s, compare {m['compare_s']} s ({m['nodes_compared']} nodes), "
        f"peak RSS {m['peak_rss_mb']} MB",
        f"host: {res['host']}",
    ]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--latency-objects", type=int, default=200)
    parser.add_argument("--merkle-keys", type=int, default=100_000)
    parser.add_argument("--lab-dir", help="use this running lab instead of starting one")
    parser.add_argument("--merkle-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.merkle_only:
        print(json.dumps(merkle(args.merkle_keys, 10)))
        return 0
    require("rclone")
    res = {"merkle": merkle_in_child(args.merkle_keys)} | asyncio.run(run(args))
    if args.json:
        print(table(res), file=sys.stderr)
        print(json.dumps(res, indent=2))
    else:
        print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
