"""Cold copy of one bucket by dragent and by ``rclone sync``, side by side, CPU-normalised.

Usage: ``python benchmarks/scale.py [--json] [--objects N] [--lab-dir DIR]``

In a lab (started for the run unless ``--lab-dir`` names a running one), ``N``
objects of mixed sizes (``benchmarks/objects.py``'s mix: 90 % 4–64 KiB, 10 %
256 KiB–1 MiB, plus two of 20 MiB) are written to region a's ``data`` bucket,
then copied from a cold start:

- dragent: the objects stream's start-up scan, shipped through region b's
  vault and applied to region b's ``data`` bucket (``dragent_cold_copy``), as
  deployed: the sending side (source and shipper) in this process, the
  receiving side (sink and mirror) in a child process, as region a's and
  region b's agents would run them; timed from the start until the last
  object is in the mirror. CPU: both processes' CPU time (every thread) over
  the copy. ``--in-process`` runs both sides in this process instead (one
  interpreter, one core's worth of Python: ``benchmarks/objects.py``'s way).
- rclone: ``rclone sync --transfers 16 --checkers 16`` of the same objects to
  another prefix of the same mirror bucket, timed the same way. CPU: the
  rclone child's user + system time (``RUSAGE_CHILDREN``).

Each reports objects/s, MB/s and objects per CPU-second, and the CPU the lab's two
S3 servers (SeaweedFS, on this machine's cores too) spent over the same time: with
them, ``host_cpu_share`` says how busy the copy kept the whole machine (1.0: every
core all the time). Then, as deployed with
``dragent run`` processes (``benchmarks/_members.py``): one agent per region, and two
per region sharing the stream through etcd (``[group]``, 8 partitions or
``--partitions``), each timed
from starting the agents until the mirror lists every object, and from the first
object in the mirror to the last (start-up left out), CPU of every agent over each;
with two, one member of region a is then killed with kill -9 and the time until the
other runs its partitions is measured. Last, the Merkle verify of
``--merkle-keys`` keys (default 1,000,000) with 10 differences from persisted trees
against rebuilding both trees from listings (``benchmarks/merkle_scale.py``).

``--json`` prints the figures as JSON on stdout and the table on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import load_config
from agent.lab import Lab
from agent.lab.stream_rig import lab_shipper, lab_sink
from benchmarks import merkle_scale
from benchmarks._baseline import require
from benchmarks._members import agents_cold_copy
from benchmarks._proccpu import s3_servers_cpu
from benchmarks._rss import peak_rss_mb
from benchmarks.objects import (
    Recorder,
    options,
    rclone_sync,
    replicating,
    wait_for,
    write_dataset,
)
from replicators import logs
from replicators.bucket import Bucket
from replicators.keys import build_key_provider
from replicators.objects.options import ObjectsOptions
from replicators.objects.source import ObjectsSource
from replicators.s3 import S3Store
from replicators.vault import Vault


def _figures(
    objects: int, total: int, seconds: float, cpu: float, servers_cpu: float
) -> dict[str, Any]:
    """The copy's figures; ``servers_cpu``: the lab's S3 servers' CPU over the same time,
    which shares this machine's cores (``host_cpu_share``: both over every core's time)."""
    everything = cpu + servers_cpu
    return {
        "objects": objects,
        "bytes": total,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "objects_per_s": round(objects / seconds, 1),
        "mb_per_s": round(total / seconds / 1e6, 1),
        "objects_per_cpu_s": round(objects / cpu, 1) if cpu > 0 else None,
        "servers_cpu_seconds": round(servers_cpu, 2),
        "all_cpu_seconds": round(everything, 2),
        "host_cpu_share": round(everything / (seconds * (os.cpu_count() or 1)), 2),
    }


async def dragent_cold_copy(
    lab: Lab,
    prefix: str,
    keys: list[str],
    total: int,
    workdir: Path,
    members: int = 1,
    in_process: bool = False,
) -> dict[str, Any]:
    """Copy ``prefix`` of region a's bucket to region b's from a cold start: with
    ``members`` > 1, by that many ``dragent run`` agents per region sharing the stream."""
    if members > 1:
        got = await agents_cold_copy(lab, prefix, len(keys), workdir / f"m{members}", members)
        return _agents_figures(len(keys), total, got)
    opts = options(lab, prefix, events=False)
    name = prefix.strip("/")
    if in_process:
        cpu0, started, servers0 = time.process_time(), time.monotonic(), s3_servers_cpu(lab)
        async with replicating(lab, opts, name, workdir / "cold") as (_, target):
            await wait_for(lambda: len(target.applied) >= len(keys), 1800)
            took = time.monotonic() - started
            cpu, servers = time.process_time() - cpu0, s3_servers_cpu(lab) - servers0
        return _figures(len(keys), total, took, cpu, servers) | {"members": members, "processes": 1}
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--receive", prefix, "--lab-dir", str(lab.root),
        "--expect", str(len(keys)), "--workdir", str(workdir / "receive"),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None
    try:
        ready = await child.stdout.readline()  # the child is set up and listing the vault
        if ready.strip() != b"ready":
            raise RuntimeError(f"the receiving process did not start: {ready!r}")
        cpu0, started, servers0 = time.process_time(), time.monotonic(), s3_servers_cpu(lab)
        async with sending(lab, opts, name, workdir / "send"):
            done = json.loads(await child.stdout.readline())
            cpu, servers = time.process_time() - cpu0, s3_servers_cpu(lab) - servers0
        await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    took = done["last_applied"] - started  # CLOCK_MONOTONIC: one clock for both processes
    return _figures(len(keys), total, took, cpu + done["cpu_s"], servers) | {
        "members": members,
        "processes": 2,
        "cpu_send_s": round(cpu, 2),
        "cpu_receive_s": round(done["cpu_s"], 2),
        "peak_rss_send_mb": round(peak_rss_mb()),
        "peak_rss_receive_mb": round(done["peak_rss_mb"]),
    }


def _agents_figures(objects: int, total: int, got: dict[str, Any]) -> dict[str, Any]:
    cpu, servers = got["cpu_seconds"], got["servers_cpu_seconds"]
    return _figures(objects, total, got["seconds"], cpu, servers) | got


@contextlib.asynccontextmanager
async def sending(lab: Lab, opts: ObjectsOptions, name: str, workdir: Path) -> AsyncIterator[None]:
    """Region a's side of the stream: source and shipper (4 PUTs in flight), looping."""
    cfg_a = load_config(lab.config_path("a"))
    peer = cfg_a.peers[0]
    async with contextlib.AsyncExitStack() as stack:
        store = await S3Store.open(peer.vault)
        stack.push_async_callback(store.aclose)
        keys = build_key_provider(peer.keys)
        stack.push_async_callback(keys.aclose)
        source = ObjectsSource(opts, await Bucket.open(opts.source), workdir / "src")
        stack.push_async_callback(source.aclose)
        shipper = lab_shipper(
            name, "objects", source, Vault(store), keys, workdir / "shipped.json",
            max_age=0.1, in_flight=4,
        )  # fmt: skip
        await shipper.recover()
        stop = asyncio.Event()

        async def ship() -> None:
            while not stop.is_set():
                await shipper.sync_once(stop)

        task = asyncio.create_task(ship())
        try:
            yield
        finally:
            stop.set()
            await task


async def receive(args: argparse.Namespace) -> None:
    """Region b's side (the child): sink and mirror until ``--expect`` keys are applied;
    prints ``ready`` once set up, then JSON: when the last was applied, and CPU time."""
    lab = Lab(Path(args.lab_dir))
    opts = options(lab, args.receive, events=False)
    cfg_b = load_config(lab.config_path("b"))
    store = await S3Store.open(load_config(lab.config_path("a")).peers[0].vault)
    keys = build_key_provider(cfg_b.keys)
    target = Recorder(await Bucket.open(opts.mirror), Path(args.workdir) / "dst")
    target.applied = {}
    sink = lab_sink(args.receive.strip("/"), "objects", target, Vault(store), keys)
    try:
        await sink.recover()
        print("ready", flush=True)
        cpu0 = time.process_time()
        stop = asyncio.Event()
        while len(target.applied) < args.expect:
            if not await sink.sync_once(stop):
                await asyncio.sleep(0.05)
        done = {
            "last_applied": max(target.applied.values()),
            "cpu_s": time.process_time() - cpu0,
            "peak_rss_mb": peak_rss_mb(),
        }
        print(json.dumps(done), flush=True)
    finally:
        await target.aclose()
        await keys.aclose()
        await store.aclose()


def rclone_cold_copy(lab: Lab, prefix: str, objects: int, total: int, workdir: Path) -> dict:
    require("rclone")
    before, servers0 = resource.getrusage(resource.RUSAGE_CHILDREN), s3_servers_cpu(lab)
    took = rclone_sync(lab, prefix, workdir)
    after, servers = resource.getrusage(resource.RUSAGE_CHILDREN), s3_servers_cpu(lab) - servers0
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return _figures(objects, total, took, cpu, servers)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.lab_dir) if args.lab_dir else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    lab = Lab(root)
    await lab.up()
    out: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prefix = f"bench-scale-{time.time_ns() % 10**9}/"
            src = await Bucket.open(options(lab, prefix, events=False).source)
            try:
                keys, total = await write_dataset(src, args.objects)
            finally:
                await src.aclose()
            out["dragent"] = await dragent_cold_copy(
                lab, prefix, keys, total, Path(tmp), in_process=args.in_process
            )
            out["rclone"] = rclone_cold_copy(lab, prefix, len(keys), total, Path(tmp))
            for members in (1, 2):
                got = await agents_cold_copy(
                    lab, prefix, len(keys), Path(tmp) / f"agents-{members}", members,
                    args.partitions,
                )  # fmt: skip
                out[f"agents_{members}"] = _agents_figures(len(keys), total, got)
    finally:
        if not args.lab_dir:
            await lab.down(purge=True)
    if args.merkle_keys:
        out["merkle"] = await asyncio.to_thread(
            merkle_scale.run, keys=args.merkle_keys, differences=10
        )
    out["host"] = {"cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 1)}
    return out


def _cell(value: Any) -> str:
    """A figure of the text table: floats to two decimals, a missing one as '-'."""
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def table(res: dict[str, Any]) -> str:
    ours, rc = res["dragent"], res["rclone"]
    one, two = res.get("agents_1", {}), res.get("agents_2", {})
    rows = [
        "cold copy, region a -> region b (SeaweedFS lab)",
        f"{'':24}{'dragent':>10}{'1 agent/region':>16}{'2 agents/region':>17}{'rclone sync':>13}",
    ]
    for label, name in (
        ("seconds", "seconds"),
        ("objects/s", "objects_per_s"),
        ("MB/s", "mb_per_s"),
        ("CPU seconds", "cpu_seconds"),
        ("objects per CPU-second", "objects_per_cpu_s"),
        ("S3 servers' CPU seconds", "servers_cpu_seconds"),
        ("all CPU seconds", "all_cpu_seconds"),
        ("share of the host's CPU", "host_cpu_share"),
    ):
        rows.append(
            f"{label:24}{_cell(ours[name]):>10}{_cell(one.get(name)):>16}"
            f"{_cell(two.get(name)):>17}{_cell(rc[name]):>13}"
        )
    for label, name in (
        ("copy seconds (start-up left out)", "copy_seconds"),
        ("copy CPU seconds", "copy_cpu_seconds"),
    ):
        rows.append(f"{label:34}{_cell(one.get(name)):>16}{_cell(two.get(name)):>17}")
    if "partitions" in two:
        rows.append(
            f"2 agents/region: {two['partitions']} partitions, start-up "
            f"{_cell(two.get('startup_seconds'))} s"
        )
    if "reassign_seconds" in two:
        rows.append(
            f"kill -9 of one of 2 agents: its partitions run again after "
            f"{two['reassign_seconds']:.2f} s (membership TTL {two['member_ttl_seconds']} s)"
        )
    if "merkle" in res:
        m = res["merkle"]
        rows.append(f"Merkle verify: {json.dumps(m)[:400]}")
    rows += [
        f"data set: {ours['objects']} objects, {ours['bytes'] / 1e6:.0f} MB; "
        "rclone: --transfers 16 --checkers 16",
        f"host: {res['host']}",
    ]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    parser.add_argument("--objects", type=int, default=1000, help="small/medium objects (+2 big)")
    parser.add_argument("--lab-dir", help="use this running lab instead of starting one")
    parser.add_argument(
        "--partitions", type=int, default=0, help="the group's partitions (default: 8)"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="dragent's two sides in this one process"
    )
    parser.add_argument(
        "--merkle-keys", type=int, default=1_000_000, help="keys of the Merkle verify (0: skip)"
    )
    parser.add_argument("--receive", help=argparse.SUPPRESS)  # the child: region b's side
    parser.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        # stdout is the protocol to the parent ("ready", then JSON): logs go to stderr (the
        # sink warns of a segment landing before the one before it, as pipelined PUTs can)
        logs.configure("logfmt", "warning")
        asyncio.run(receive(args))
        return 0
    require("rclone")
    res = asyncio.run(run(args))
    if args.json:
        print(table(res), file=sys.stderr)
        print(json.dumps(res, indent=2))
    else:
        print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
