"""The objects stream end to end on real SeaweedFS: region a's bucket → b's vault → b's mirror."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from agent.config import AgentConfig
from agent.lab import Lab
from replicators.objects.records import META_HASH, META_VERSION, content_hash
from tests.support import eventually
from tests.test_objects_rig import Rig, options, same

pytestmark = pytest.mark.lab


@pytest_asyncio.fixture(loop_scope="session")
async def rig(
    lab: Lab, cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> AsyncIterator[Rig]:
    yield Rig(unique, options(lab, f"{unique}/", scan_interval=0.5), cfg_a, cfg_b, tmp_path)


async def test_scan_mirrors_puts_overwrites_large_objects_and_deletes(rig: Rig) -> None:
    src = await rig.source_bucket()
    dst = await rig.mirror_bucket()
    try:
        for i in range(30):
            meta = {"owner": f"team-{i % 3}"}
            await src.write(f"small/{i:03d}", os.urandom(100 + i * 500), "text/plain", meta)
        big = os.urandom(12 * 1024 * 1024 + 123)
        await src.write("big/one.bin", big, "application/octet-stream", {"kind": "model"})
        async with rig.running() as (shipper, _):
            await eventually(lambda: same(src, dst), within=60, every=0.5)
            for i in range(0, 30, 3):
                await src.write(f"small/{i:03d}", b"v2-" + os.urandom(50), "text/csv", {"v": "2"})
            for i in range(1, 30, 5):
                await src.delete(f"small/{i:03d}")
            await src.write("big/one.bin", os.urandom(6 * 1024 * 1024), "", {})
            await eventually(lambda: same(src, dst), within=60, every=0.5)
            counts = shipper.source.pending_counts  # type: ignore[attr-defined]
            await eventually(lambda: counts() == {"objects": 0, "bytes": 0}, within=30)
        head = await dst.head("small/000")
        assert head.metadata[META_HASH] == content_hash(await src.read("small/000", ""))
        assert head.metadata[META_VERSION]
    finally:
        await src.aclose()
        await dst.aclose()


async def test_verify_reports_then_repairs_the_mirror(rig: Rig) -> None:
    from verifiers.objects import verify_buckets

    src, dst = await rig.source_bucket(), await rig.mirror_bucket()
    try:
        for i in range(20):
            await src.write(f"v/{i:02d}", os.urandom(2000 + i), "text/plain", {"i": str(i)})
        await src.write("v/large", os.urandom(7 * 1024 * 1024), "application/x-model", {})
        async with rig.running():
            await eventually(lambda: same(src, dst), within=60, every=0.5)
        clean = await verify_buckets(rig.name, rig.opts, deep=True)
        assert clean["ok"] and clean["differences"] == []
        assert clean["roots"]["source"] == clean["roots"]["mirror"]
        # break the mirror: silently corrupt bytes (metadata intact), lose one, add one
        head = await dst.head("v/03")
        await dst.write("v/03", b"corrupt", head.content_type, head.metadata)
        await dst.delete("v/04")
        await dst.write("v/zz-extra", b"x", "", {})
        shallow = await verify_buckets(rig.name, rig.opts)
        wheres = {d["where"] for d in shallow["differences"]}
        assert {"v/03", "v/04", "v/zz-extra"} <= wheres and not shallow["ok"]
        deep = await verify_buckets(rig.name, rig.opts, deep=True)
        assert {"what": "bytes differ from their recorded hash", "where": "v/03"} in deep[
            "differences"
        ]
        assert (await dst.head("v/zz-extra")).size == 1  # not repaired: dry run
        fixed = await verify_buckets(rig.name, rig.opts, deep=True, repair=True)
        assert fixed["repaired"] >= 3
        after = await verify_buckets(rig.name, rig.opts, deep=True)
        assert after["ok"] and after["roots"]["source"] == after["roots"]["mirror"]
        assert await same(src, dst)
    finally:
        await src.aclose()
        await dst.aclose()


async def test_background_anti_entropy_repairs_on_the_active_side(
    rig: Rig, cfg_a: AgentConfig, tmp_path: Path
) -> None:
    import asyncio
    import json

    from replicators.objects.kind import background
    from tests.test_objects_rig import stream_config

    opts = rig.opts.model_copy(update={"verify_interval": 30.0})
    stream = stream_config(rig.name, opts)
    agent = cfg_a.model_copy(update={"data_dir": tmp_path / "agent"})
    assert [j.name for j in background(stream, agent, "passive", tmp_path)] == ["mirror-tree"]
    (job,) = background(stream, agent, "active", tmp_path)
    assert job.every == 30.0
    src, dst = await rig.source_bucket(), await rig.mirror_bucket()
    try:
        for i in range(3):
            await src.write(f"ae/{i}", os.urandom(500), "text/plain", {"n": str(i)})
        await job.runner.recover()
        assert await job.runner.sync_once(asyncio.Event()) is False
        assert await same(src, dst)  # repaired without the stream
        report = json.loads((tmp_path / "verify-latest.json").read_text())
        assert report["repaired"] == 3 and job.runner.repairs == 3
    finally:
        await src.aclose()
        await dst.aclose()


async def test_a_repair_never_deletes_more_than_the_mass_delete_guard_allows(rig: Rig) -> None:
    """The active side's verify (anti-entropy) cannot see the passive side's hold: a repair
    that would delete a mass of mirror keys (a source that lists empty, a script that
    deleted a fifth) deletes none of them and says why; a few stray keys it deletes."""
    from verifiers.objects import verify_buckets

    guard = rig.opts.delete_guard.model_copy(update={"min_deletes": 5})
    opts = rig.opts.model_copy(update={"delete_guard": guard})
    src, dst = await rig.source_bucket(), await rig.mirror_bucket()
    try:
        for i in range(40):
            await dst.write(f"m/{i:02d}", b"x", "", {})  # in the mirror only
        held = await verify_buckets(rig.name, opts, repair=True)
        assert not held["ok"] and held["repaired"] == 0
        assert all("mass-delete guard" in d["why"] for d in held["differences"])
        assert (await dst.head("m/00")).size == 1
        for i in range(4, 40):
            await dst.delete(f"m/{i:02d}")
        few = await verify_buckets(rig.name, opts, repair=True)
        assert few["ok"] and few["repaired"] == 4
    finally:
        await src.aclose()
        await dst.aclose()
