"""CPU per S3 request in this process (botocore, aiohttp, the event loop), by
``replicators.s3.Tuning``: botocore's own behaviour, each candidate option alone,
all of them, ``replicators.s3.TUNING`` (the ones dragent applies), and
``S3Config.data_client = "obstore"`` (the hot requests through obstore).

Usage: ``python benchmarks/s3_request_cpu.py [--json] [--requests N] [--rounds R]
[--no-obstore] [--endpoint URL --bucket B --access-key-env A --secret-key-env S]``

Against the given S3 endpoint, or a throw-away ``weed server`` (SeaweedFS, the
``weed`` next to this Python) started for the run on free ports and killed at
the end. For each variant, one client opened through ``replicators.s3.s3_client``
(as ``Bucket``, the ``objects`` kind's store), then, one request at a time:

- ``put``: ``N`` ``Bucket.write`` of 16 KiB (botocore adds its own checksum);
- ``put_crc32c``: ``N`` ``S3Store.put`` of 16 KiB (our CRC32C header, as segments);
- ``get``: ``N`` ``Bucket.fetch`` of those objects (bodies read);
- ``head``: ``N`` ``Bucket.head``;
- ``list``: ``Bucket.scan`` of the ``N`` keys, 10 times (one page per 1,000 keys).

CPU time (``time.process_time``), not wall time: the figures hold on a shared
machine. Variants take turns within each round (in reverse order every other
round); each figure is the median over the rounds, in ms of CPU per request
(``list``: per page, and µs per key listed).
Before timing, every variant's ``head``/``fetch``/``scan`` results are checked equal
to botocore's own on the same objects. ``--json`` prints the figures as JSON on
stdout and the table on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import emit
from replicators import s3
from replicators.bucket import Bucket, find_weed_binary
from replicators.settings import S3Config

SIZE = 16 * 1024
LISTINGS = 10
PHASES = ("put", "put_crc32c", "get", "head", "list")


CANDIDATES = s3.Tuning(
    parameter_validation=False,
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
    static_user_agent=True,
    fast_timestamps=True,
)
"""Every option tried; ``replicators.s3.TUNING`` is the ones applied."""

OBSTORE = "data_client=obstore"
"""``S3Config.data_client = "obstore"``: PUT, GET and HEAD through obstore (the LIST
through botocore with ``TUNING``)."""


def variants() -> dict[str, s3.Tuning]:
    """botocore's defaults, each candidate alone, all candidates, and ``TUNING``."""
    out = {"botocore": s3.BOTOCORE}
    for f in dataclasses.fields(s3.Tuning):
        value = getattr(CANDIDATES, f.name)
        out[f"{f.name}={value}"] = dataclasses.replace(s3.BOTOCORE, **{f.name: value})
    out["all candidates"] = CANDIDATES
    if s3.TUNING != CANDIDATES:
        out["TUNING (applied)"] = s3.TUNING
    return out


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def weed_server() -> Iterator[tuple[str, str, str]]:
    """A throw-away SeaweedFS with its S3 gateway: (endpoint, access key, secret key)."""
    home = Path(tempfile.mkdtemp(prefix="s3cpu-"))
    access, secret = "BENCH" + secrets.token_hex(6).upper(), secrets.token_urlsafe(24)
    identity = {"name": "bench", "credentials": [{"accessKey": access, "secretKey": secret}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    (home / "s3.json").write_text(json.dumps({"identities": [identity]}))
    flags = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port")
    flags += ("volume.port.grpc", "filer.port", "filer.port.grpc")
    ports = dict(zip(flags, _free_ports(len(flags)), strict=True))
    argv = [find_weed_binary(), "-logtostderr", "server", f"-dir={home}", "-ip=127.0.0.1"]
    argv += ["-ip.bind=127.0.0.1", "-master.peers=none", "-master.volumeSizeLimitMB=64"]
    argv += ["-master.telemetry=false", "-volume.max=0", "-volume.preStopSeconds=0"]
    argv += ["-filer=true", "-s3=true", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    argv += [f"-s3.config={home / 's3.json'}", *(f"-{k}={v}" for k, v in ports.items())]
    with (home / "weed.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not all(_healthy(ports[k]) for k in ("s3.port", "volume.port")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"weed did not start; see {home / 'weed.log'}")
            time.sleep(0.3)
        yield f"http://127.0.0.1:{ports['s3.port']}", access, secret
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(home, ignore_errors=True)
        for port in ports.values():  # the unix sockets weed leaves, named by our ports
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


async def _open(cfg: S3Config, tuning: s3.Tuning) -> Bucket:
    stack = contextlib.AsyncExitStack()
    client = await stack.enter_async_context(s3.s3_client(cfg, tuning=tuning))
    return Bucket(cfg, client, stack)


async def _phase(bucket: Bucket, phase: str, prefix: str, n: int) -> tuple[float, int]:
    """CPU seconds of one phase, and the requests it made."""
    body = os.urandom(SIZE)
    keys = [f"{prefix}/{i:06d}" for i in range(n)]
    start = time.process_time()
    if phase == "put":
        for key in keys:
            await bucket.write(key, body, "application/octet-stream", {"n": "1"})
    elif phase == "put_crc32c":
        for key in keys:
            await bucket.put(f"{key}.c", body)
    elif phase == "get":
        for key in keys:
            await bucket.fetch(key, SIZE)
    elif phase == "head":
        for key in keys:
            await bucket.head(key)
    else:
        pages = 0
        for _ in range(LISTINGS):
            async for _page in bucket.scan(f"{prefix}/"):
                pages += 1
        return time.process_time() - start, pages
    return time.process_time() - start, n


async def _check_same(buckets: dict[str, Bucket], prefix: str) -> None:
    """Every variant reads the same states and bytes as botocore's own configuration."""
    key = f"{prefix}/000000"
    want = None
    for name, bucket in buckets.items():
        got = (
            await bucket.head(key),
            await bucket.fetch(key, SIZE),
            [page async for page in bucket.scan(f"{prefix}/")],
        )
        if want is None:
            want = got
        elif got != want:
            raise SystemExit(f"{name}: results differ from botocore's own: {got} != {want}")


async def run(args: argparse.Namespace, endpoint: str, access: str, secret: str) -> dict[str, Any]:
    os.environ["S3CPU_ACCESS"], os.environ["S3CPU_SECRET"] = access, secret
    cfg = S3Config(
        endpoint=endpoint,
        bucket=args.bucket,
        access_key="env:S3CPU_ACCESS",
        secret_key="env:S3CPU_SECRET",
        addressing_style="path",
        prefix=f"s3cpu-{secrets.token_hex(3)}/",
    )
    async with s3.s3_client(cfg) as client:
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            await client.create_bucket(Bucket=args.bucket)
    chosen = variants()
    buckets = {name: await _open(cfg, tuning) for name, tuning in chosen.items()}
    if not args.no_obstore:  # as deployed: Bucket.open, TUNING for what obstore leaves
        fast = await Bucket.open(cfg.model_copy(update={"data_client": "obstore"}))
        assert fast._fast is not None, "obstore is not used for this endpoint"
        buckets[OBSTORE] = fast
    samples: dict[str, dict[str, list[float]]] = {v: {p: [] for p in PHASES} for v in buckets}
    try:
        for name, bucket in buckets.items():  # warm up: connections, models, first parses
            await _phase(bucket, "put", f"warm/{name}", 20)
            await _phase(bucket, "get", f"warm/{name}", 20)
        await _phase(buckets["botocore"], "put", "same", 3)
        await _check_same(buckets, "same")
        order = list(enumerate(buckets.items()))
        for r in range(args.rounds):
            for i, (name, bucket) in order if r % 2 == 0 else reversed(order):
                prefix = f"v{i}"
                for phase in PHASES:
                    cpu, requests = await _phase(bucket, phase, prefix, args.requests)
                    samples[name][phase].append(cpu / requests)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for bucket in buckets.values():
            await bucket.aclose()
    keys_per_page = min(args.requests, 1000)
    result: dict[str, Any] = {
        "requests": args.requests,
        "rounds": args.rounds,
        "object_bytes": SIZE,
        "list_keys_per_page": keys_per_page,
        "endpoint": "weed (started for the run)" if args.endpoint is None else args.endpoint,
        "candidates": dataclasses.asdict(CANDIDATES),
        "tuning": dataclasses.asdict(s3.TUNING),
        "ms_cpu_per_request": {
            name: {p: round(statistics.median(v) * 1e3, 4) for p, v in phases.items()}
            for name, phases in samples.items()
        },
    }
    base = result["ms_cpu_per_request"]["botocore"]
    result["saved_vs_botocore"] = {
        name: {p: f"{1 - v[p] / base[p]:.0%}" for p in PHASES}
        for name, v in result["ms_cpu_per_request"].items()
    }
    return result


def table(result: dict[str, Any]) -> str:
    head = "| variant | " + " | ".join(PHASES) + " | list µs/key |"
    lines = [
        f"ms of CPU per request (median of {result['rounds']} rounds of "
        f"{result['requests']} requests; list: per page of {result['list_keys_per_page']} keys)",
        "",
        head,
        "| --- " * (len(PHASES) + 2) + "|",
    ]
    saved = result["saved_vs_botocore"]
    for name, v in result["ms_cpu_per_request"].items():
        cells = [
            f"{v[p]:.3f} ({saved[name][p]})" if name != "botocore" else f"{v[p]:.3f}"
            for p in PHASES
        ]
        per_key = v["list"] * 1e3 / result["list_keys_per_page"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per_key:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--endpoint", help="an S3 endpoint (default: start a weed server)")
    parser.add_argument("--bucket", default="s3cpu")
    parser.add_argument("--no-obstore", action="store_true", help="botocore's variants only")
    parser.add_argument("--access-key-env", default="AWS_ACCESS_KEY_ID")
    parser.add_argument("--secret-key-env", default="AWS_SECRET_ACCESS_KEY")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.endpoint is None:
            endpoint, access, secret = stack.enter_context(weed_server())
        else:
            endpoint = args.endpoint
            access, secret = os.environ[args.access_key_env], os.environ[args.secret_key_env]
        result = asyncio.run(run(args, endpoint, access, secret))
    emit(result, table(result), args.json)


if __name__ == "__main__":
    main()
