"""Two agents as processes replicating a bucket while it is written, overwritten and
deleted concurrently, and the sending agent is killed with kill -9 and restarted."""

from __future__ import annotations

import asyncio
import os
import random
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from agent.agentproc import AgentProcess
from agent.lab import Lab
from replicators.bucket import Bucket, find_weed_binary
from replicators.errors import NotFound
from replicators.objects.records import META_VERSION, Version
from tests.support import eventually
from tests.test_objects_rig import filer_address, options, s3, same
from verifiers.objects import verify_buckets

pytestmark = pytest.mark.lab
MiB = 1024 * 1024
LARGE = (20 * MiB, 30 * MiB)


def config(lab: Lab, region: str, workdir: Path, stream: str, prefix: str) -> Path:
    data = tomllib.loads(lab.config_path(region).read_text())
    data["data_dir"] = str(workdir / region)
    objects: dict[str, Any] = {
        "source": s3(lab, "a", prefix),
        "mirror": s3(lab, "b", prefix),
        "events": "filer",
        "filer": {"filer": filer_address(lab, "a"), "weed": find_weed_binary()},
        "scan_interval": "5s",
        "inline_max": "1MiB",
        # the churn deletes ~15 % of the keys in minutes: by design a mass delete, which
        # the guard would hold (tests/test_objects_guard.py tests the guard)
        "delete_guard": {"enabled": False},
    }
    data["streams"] = [
        {"name": stream, "kind": "objects", "segment_max_age": "200ms", "objects": objects}
    ]
    path = workdir / f"{region}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def agent(lab: Lab, region: str, workdir: Path, stream: str, prefix: str) -> AgentProcess:
    cfg = config(lab, region, workdir, stream, prefix)
    log, pid = workdir / f"{region}.log", workdir / f"{region}.pid"
    return AgentProcess(cfg, log, pid, lab.agent_url(region))


async def churn(src: Bucket, keys: list[str], large: list[str], rounds: int, seed: int) -> None:
    """Writes, overwrites and deletes, 8 at a time."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(8)

    async def one(key: str) -> None:
        async with sem:
            action = rng.random()
            if action < 0.15:
                await src.delete(key)
            else:
                size = rng.choice((0, 100, 4000, 60_000, 300_000))
                if key in large:
                    size = rng.randint(*LARGE)
                meta = {"round": str(rng.randint(0, 9))}
                await src.write(key, os.urandom(size), rng.choice(("text/plain", "")), meta)

    for _ in range(rounds):
        batch = rng.sample(keys, len(keys) // 3) + rng.sample(large, 1)
        async with asyncio.TaskGroup() as tg:
            for key in batch:
                tg.create_task(one(key))


async def run_scenario(
    lab: Lab, tmp_path: Path, unique: str, n: int, n_large: int, within: float = 240
) -> None:
    prefix = f"{unique}/"
    a = agent(lab, "a", tmp_path, unique, prefix)
    b = agent(lab, "b", tmp_path, unique, prefix)
    opts = options(lab, prefix)
    src, dst = await Bucket.open(opts.source), await Bucket.open(opts.mirror)
    keys = [f"k/{i:05d}" for i in range(n)]
    large = [f"large/{i}" for i in range(n_large)]
    try:
        await b.start()
        await a.start()
        await a.wait_ready()
        await b.wait_ready()
        writer = asyncio.create_task(churn(src, keys, large, rounds=4, seed=1))
        for pause in (2.0, 3.0):
            await asyncio.sleep(pause)
            await a.kill()  # kill -9 mid-stream, mid-upload
            await asyncio.sleep(0.5)
            await a.start()
            await a.wait_ready()
        await writer
        await eventually(lambda: same(src, dst), within=within, every=max(3, n / 1000))
        report = await verify_buckets(unique, opts, deep=True)
        assert report["ok"] and report["roots"]["source"] == report["roots"]["mirror"]
        await _newest_versions_won(src, dst)
    finally:
        await a.stop(grace=10)
        await b.stop(grace=10)
        await src.aclose()
        await dst.aclose()


async def _newest_versions_won(src: Bucket, dst: Bucket) -> None:
    """Each mirror object carries the source's current LastModified as its version time."""
    async for page in src.scan():
        for obj in page:
            try:
                mirrored = await dst.head(obj.key)
            except NotFound:
                pytest.fail(f"{obj.key} missing in the mirror")
            version = Version.decode(mirrored.metadata[META_VERSION])
            assert version.time_ns == obj.time_ns, obj.key


async def test_kill_9_while_churning_mirror_equals_source(
    lab: Lab, tmp_path: Path, unique: str
) -> None:
    """A fifth of the writes are empty objects, so some keys are rewritten with the same
    bytes and other metadata within one LastModified second (see ``index.SETTLE_NS``)."""
    await run_scenario(lab, tmp_path, unique, n=200, n_large=1)


@pytest.mark.soak
@pytest.mark.timeout(1800)
async def test_kill_9_soak_1000_objects(lab: Lab, tmp_path: Path, unique: str) -> None:
    await run_scenario(lab, tmp_path, unique, n=1000, n_large=3, within=600)


@pytest.mark.soak
@pytest.mark.timeout(3600)
async def test_kill_9_soak_10000_objects_with_100mib_ones(
    lab: Lab, tmp_path: Path, unique: str
) -> None:
    global LARGE
    LARGE = (100 * MiB, 120 * MiB)
    await run_scenario(lab, tmp_path, unique, n=10_000, n_large=4, within=1800)
