"""Point-in-time restore of a prefix from region b's vault into a fresh bucket."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config
from agent.lab import Lab
from agent.lab.seaweed import ensure_buckets
from replicators.bucket import Bucket
from replicators.errors import IntegrityError
from replicators.keys import build_key_provider
from replicators.objects.restore import restore
from replicators.s3 import S3Store
from replicators.vault import SegmentRef, Vault
from tests.support import eventually
from tests.test_objects_rig import Rig, options, same, snapshot

pytestmark = pytest.mark.lab


async def test_restore_a_prefix_to_a_time_in_the_past(
    lab: Lab, cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    rig = Rig(unique, options(lab, f"{unique}/", scan_interval=0.5), cfg_a, cfg_b, tmp_path)
    src, dst = await rig.source_bucket(), await rig.mirror_bucket()
    then: dict[str, bytes] = {}
    try:
        async with rig.running():
            for i in range(8):
                then[f"p/{i}"] = os.urandom(1000 + i)
                await src.write(f"p/{i}", then[f"p/{i}"], "text/plain", {"gen": "1"})
            then["p/big"] = os.urandom(6 * 1024 * 1024 + 7)
            await src.write("p/big", then["p/big"], "application/x-model", {"gen": "1"})
            await src.write("other/x", b"outside the prefix", "", {})
            await eventually(lambda: same(src, dst), within=60, every=0.5)
            await asyncio.sleep(1.2)  # LastModified has a one-second resolution here
            at = time.time_ns()
            await asyncio.sleep(1.2)
            await src.write("p/0", b"second generation", "text/plain", {"gen": "2"})
            await src.write("p/big", os.urandom(6 * 1024 * 1024), "", {"gen": "2"})
            await src.delete("p/1")
            await src.write("p/new", b"born after", "", {})
            await eventually(lambda: same(src, dst), within=60, every=0.5)
        bucket = f"restore-{time.time_ns() % 10**9}"
        await ensure_buckets(lab.s3_endpoint("b"), lab.s3_credentials, [bucket])
        into_cfg = rig.opts.mirror.model_copy(update={"bucket": bucket, "prefix": ""})
        into = await Bucket.open(into_cfg)
        store = await S3Store.open(cfg_b.vault)
        keys = build_key_provider(cfg_b.keys)
        try:
            result = await restore(Vault(store), keys, unique, "p/", at, into, progress=False)
            assert result.objects == len(then)
            restored = await snapshot(into)
            assert sorted(restored) == sorted(then)
            for key, body in then.items():
                assert await into.read(key, "") == body
            assert (await into.head("p/3")).metadata == {"gen": "1"}
            assert (await into.head("p/3")).content_type == "text/plain"
            await _through_the_cli(lab, tmp_path, unique, at, then)
            # an old segment copied under the next name (a replay of old puts) fails loudly
            vault = Vault(store)
            refs = [r async for r in vault.segments(unique)]
            renamed = SegmentRef(refs[-1].epoch, refs[-1].seq + 1, unique)
            await store.put(renamed.key, await vault.get_segment(refs[0]))
            with pytest.raises(IntegrityError, match="seq"):
                await restore(vault, keys, unique, "p/", time.time_ns(), into, progress=False)
        finally:
            await keys.aclose()
            await store.aclose()
            await into.aclose()
    finally:
        await src.aclose()
        await dst.aclose()


async def _through_the_cli(
    lab: Lab, tmp_path: Path, unique: str, at: int, then: dict[str, bytes]
) -> None:
    """``dragent restore objects`` and ``dragent objects verify`` on region b's config."""
    from agent.cli import main
    from tests.test_objects_kill import config

    cfg = str(config(lab, "b", tmp_path, unique, f"{unique}/"))
    bucket = f"restore-cli-{time.time_ns() % 10**9}"
    await ensure_buckets(lab.s3_endpoint("b"), lab.s3_credentials, [bucket])
    argv = ["restore", "objects", "--config", cfg, "--bucket", "data", "--prefix", "p/"]
    argv += ["--to", str(at / 1e9), "--into", bucket]
    assert await asyncio.to_thread(main, argv) == 0
    cfg_b = load_config(cfg)
    assert cfg_b.streams[0].objects is not None
    target = cfg_b.streams[0].objects.mirror.model_copy(
        update={"bucket": bucket, "prefix": f"{unique}/"}
    )
    restored = await Bucket.open(target)
    try:
        assert sorted(await snapshot(restored)) == sorted(then)
    finally:
        await restored.aclose()
    out = tmp_path / "report.md"
    argv = ["objects", "verify", "--config", cfg, "--dry-run", "--format", "md", "--out", str(out)]
    assert await asyncio.to_thread(main, argv) == 0
    text = out.read_text()
    assert "**PASS**" in text and "Signed ed25519" in text
