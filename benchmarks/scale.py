"""Cold copy of one bucket by dragent and by ``rclone sync``, side by side, CPU-normalised.

Usage: ``python benchmarks/scale.py [--json] [--objects N] [--lab-dir DIR]``

In a lab (started for the run unless ``--lab-dir`` names a running one), ``N``
objects of mixed sizes (``benchmarks/objects.py``'s mix: 90 % 4–64 KiB, 10 %
256 KiB–1 MiB, plus two of 20 MiB) are written to region a's ``data`` bucket,
then copied from a cold start:

- dragent: the objects stream's start-up scan, shipped through region b's
  vault and applied to region b's ``data`` bucket, shipper and sink in this
  process (``dragent_cold_copy``); timed from the start until the last object
  is in the mirror. CPU: this process's CPU time (every thread) over the copy.
- rclone: ``rclone sync --transfers 16 --checkers 16`` of the same objects to
  another prefix of the same mirror bucket, timed the same way. CPU: the
  rclone child's user + system time (``RUSAGE_CHILDREN``).

Each reports objects/s, MB/s and objects per CPU-second. ``--json`` prints the
figures as JSON on stdout and the table on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.lab import Lab
from benchmarks._baseline import require
from benchmarks.objects import options, rclone_sync, replicating, wait_for, write_dataset
from replicators.bucket import Bucket


def _figures(objects: int, total: int, seconds: float, cpu: float) -> dict[str, Any]:
    return {
        "objects": objects,
        "bytes": total,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "objects_per_s": round(objects / seconds, 1),
        "mb_per_s": round(total / seconds / 1e6, 1),
        "objects_per_cpu_s": round(objects / cpu, 1) if cpu > 0 else None,
    }


async def dragent_cold_copy(
    lab: Lab, prefix: str, keys: list[str], total: int, workdir: Path, members: int = 1
) -> dict[str, Any]:
    """Copy ``prefix`` of region a's bucket to region b's from a cold start with ``members``
    agents sharing the stream (only 1 so far: in this process)."""
    if members != 1:
        raise NotImplementedError("a stream shared by several members is not built yet")
    opts = options(lab, prefix, events=False)
    cpu0, started = time.process_time(), time.monotonic()
    async with replicating(lab, opts, prefix.strip("/"), workdir / "cold") as (_, target):
        await wait_for(lambda: len(target.applied) >= len(keys), 1800)
        took = time.monotonic() - started
        cpu = time.process_time() - cpu0
    return _figures(len(keys), total, took, cpu) | {"members": members}


def rclone_cold_copy(lab: Lab, prefix: str, objects: int, total: int, workdir: Path) -> dict:
    require("rclone")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    took = rclone_sync(lab, prefix, workdir)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return _figures(objects, total, took, cpu)


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
            out["dragent"] = await dragent_cold_copy(lab, prefix, keys, total, Path(tmp))
            out["rclone"] = rclone_cold_copy(lab, prefix, len(keys), total, Path(tmp))
    finally:
        if not args.lab_dir:
            await lab.down(purge=True)
    out["host"] = {"cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 1)}
    return out


def table(res: dict[str, Any]) -> str:
    ours, rc = res["dragent"], res["rclone"]
    rows = [
        "cold copy, region a -> region b (SeaweedFS lab)",
        f"{'':24}{'dragent (1 member)':>20}{'rclone sync':>14}",
    ]
    for label, name in (
        ("seconds", "seconds"),
        ("objects/s", "objects_per_s"),
        ("MB/s", "mb_per_s"),
        ("CPU seconds", "cpu_seconds"),
        ("objects per CPU-second", "objects_per_cpu_s"),
    ):
        rows.append(f"{label:24}{ours[name]!s:>20}{rc[name]!s:>14}")
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
    args = parser.parse_args()
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
