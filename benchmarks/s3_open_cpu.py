"""CPU to open an S3 store and make its first request, as an agent does for every
partition it takes: stores sharing clients (``replicators.s3_clients``: one botocore
client per endpoint and settings, one TLS context per CA bundle, one obstore client
per configuration) against a client of their own each (the baseline: what every
store cost before, a botocore client, its TLS context and an obstore client each).

Usage: ``python benchmarks/s3_open_cpu.py [--json] [--stores N] [--rounds R]``

Against a throw-away ``weed server`` (``s3_request_cpu.weed_server``). Each round
opens ``N`` stores one way, each followed by its first requests (a LIST: botocore, as
a recovering shipper or sink; a GET of a missing key: obstore), closes them, then the
same the other way;
CPU time (``time.process_time``, every thread), median over the rounds, in ms per
store. ``--json``: JSON on stdout, the table on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import emit
from benchmarks.s3_request_cpu import weed_server
from replicators import s3, s3_obstore, s3_tls
from replicators.errors import NotFound
from replicators.s3 import S3Store
from replicators.settings import S3Config


async def _own_client(cfg: S3Config) -> S3Store:
    """A store with a client of its own, as before sharing: its botocore client, a TLS
    context built for it alone, and an obstore client of its own."""
    stack = contextlib.AsyncExitStack()
    client = await stack.enter_async_context(s3.s3_client(cfg))
    store = S3Store(cfg, client, stack)
    built = s3_obstore._store.__wrapped__(cfg.model_copy(update={"prefix": ""}), None, None)
    store._fast = None if built is None else s3_obstore.FastS3(built)
    return store


async def _first_request(store: S3Store) -> None:
    """A LIST (botocore, as a sink's or shipper's recovery) and a GET (obstore)."""
    async for _ in store.list("absent/"):
        pass
    with contextlib.suppress(NotFound):
        await store.get("absent-key")


async def _round(cfg: S3Config, n: int, shared: bool) -> float:
    """CPU seconds per store: open ``n``, each followed by its first request, then close
    them (all held open until then, as a member holds its partitions' stores)."""
    start = time.process_time()
    stores = []
    for _ in range(n):
        store = await (S3Store.open(cfg) if shared else _own_client(cfg))
        if not shared:
            s3_tls._context.cache_clear()  # its first request builds a context of its own
        await _first_request(store)
        stores.append(store)
    for store in stores:
        await store.aclose()
    return (time.process_time() - start) / n


async def run(args: argparse.Namespace, endpoint: str, access: str, secret: str) -> dict[str, Any]:
    os.environ["S3OPEN_ACCESS"], os.environ["S3OPEN_SECRET"] = access, secret
    cfg = S3Config(
        endpoint=endpoint,
        bucket="s3open",
        access_key="env:S3OPEN_ACCESS",
        secret_key="env:S3OPEN_SECRET",
        addressing_style="path",
    )
    async with s3.s3_client(cfg) as client:
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            await client.create_bucket(Bucket=cfg.bucket)
    await _round(cfg, 2, shared=True)  # warm up: models parsed, first context built
    await _round(cfg, 2, shared=False)
    samples: dict[str, list[float]] = {"shared": [], "own_client": []}
    for r in range(args.rounds):
        for shared in (True, False) if r % 2 == 0 else (False, True):
            cost = await _round(cfg, args.stores, shared)
            samples["shared" if shared else "own_client"].append(cost)
    ms = {name: round(statistics.median(v) * 1e3, 2) for name, v in samples.items()}
    return {
        "stores": args.stores,
        "rounds": args.rounds,
        "ms_cpu_per_store": ms,
        "ratio": round(ms["own_client"] / ms["shared"], 1) if ms["shared"] else None,
    }


def table(result: dict[str, Any]) -> str:
    ms = result["ms_cpu_per_store"]
    return "\n".join(
        [
            f"ms of CPU to open a store and make its first request (median of "
            f"{result['rounds']} rounds of {result['stores']} stores)",
            f"shared clients: {ms['shared']:.2f}   a client of its own each: "
            f"{ms['own_client']:.2f}   ({result['ratio']}x)",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--stores", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with weed_server() as (endpoint, access, secret):
        result = asyncio.run(run(args, endpoint, access, secret))
    emit(result, table(result), args.json)


if __name__ == "__main__":
    main()
