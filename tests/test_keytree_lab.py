"""Verify from persisted key trees on real SeaweedFS buckets: only where the trees differ,
each candidate confirmed against both buckets before it is reported or repaired."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from agent.config import AgentConfig
from agent.lab import Lab
from replicators.objects import records as rec
from replicators.objects.index import Entry, ShippedIndex
from replicators.objects.trees import TreeStore, update_from_records
from tests.test_objects_rig import Rig, options
from verifiers.objects import copy_object, rebuild_mirror_tree, verify_buckets

pytestmark = pytest.mark.lab


@pytest_asyncio.fixture(loop_scope="session")
async def rig(
    lab: Lab, cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> AsyncIterator[Rig]:
    yield Rig(unique, options(lab, f"{unique}/"), cfg_a, cfg_b, tmp_path)


async def _ship(index: ShippedIndex, src: object, key: str) -> None:
    """What the shipper's ack does: the key's state, durable, into the index (and tree)."""
    s = await src.head(key)  # type: ignore[attr-defined]
    digest = await src.content_hash(key, s.etag)  # type: ignore[attr-defined]
    index.commit([(key, Entry(key, s.etag, s.size, s.time_ns, digest, "", time.time_ns()))])


async def test_verify_from_persisted_trees_confirms_before_repairing(
    rig: Rig, tmp_path: Path
) -> None:
    src, dst = await rig.source_bucket(), await rig.mirror_bucket()
    index_path, mirror_path = tmp_path / "shipped.sqlite", tmp_path / "mirror-tree.sqlite"
    trees = (index_path, mirror_path)
    try:
        index = ShippedIndex(index_path)
        for i in range(12):
            key = f"t/{i:02d}"
            await src.write(key, os.urandom(500 + i), "text/plain", {"i": str(i)})
            await copy_object(src, dst, key, int(rig.opts.part_size))
            await _ship(index, src, key)
        index.close()
        mtree = TreeStore(mirror_path)
        counts = await rebuild_mirror_tree(mtree, dst)
        assert counts == {"listed": 12, "headed": 12, "keys": 12}
        again = await rebuild_mirror_tree(mtree, dst)  # etags known: no HEAD
        assert again["headed"] == 0

        clean = await verify_buckets(rig.name, rig.opts, index_path=index_path, trees=trees)
        assert clean["from_trees"] and clean["ok"] and clean["candidates"] == 0
        assert clean["roots"]["source"] == clean["roots"]["mirror"]
        assert clean["counts"] == {"source": 12, "mirror": 12}

        # a change shipped but not in the mirror: found, confirmed, repaired, tree updated
        await src.write("t/new", b"fresh", "text/plain", {})
        index = ShippedIndex(index_path)
        await _ship(index, src, "t/new")
        index.close()
        # a stale mirror tree (the bucket is right): a candidate, not a difference
        mtree.remove("t/05")
        dry = await verify_buckets(rig.name, rig.opts, index_path=index_path, trees=trees)
        assert dry["differences"] == [{"what": "missing in the mirror", "where": "t/new"}]
        assert dry["candidates"] == 2 and dry["candidates_not_confirmed"] == 1
        fixed = await verify_buckets(
            rig.name, rig.opts, index_path=index_path, trees=trees, repair=True
        )
        assert fixed["repaired"] == 1 and fixed["ok"]
        assert await dst.read("t/new", "") == b"fresh"
        assert mtree.get("t/new") is not None

        # what the sink applies reaches the mirror's tree
        await dst.delete("t/05")
        await src.delete("t/05")
        index = ShippedIndex(index_path)
        index.commit([("t/05", None)])
        index.close()
        update_from_records(mtree, [rec.Delete("t/05", rec.Version(time.time_ns(), 99))])
        mtree.put("t/05", 1, "0" * 32)  # stale again, then a rebuild catches the drift
        await dst.delete("t/06")  # drift: behind the tree's back
        unseen = await verify_buckets(rig.name, rig.opts, index_path=index_path, trees=trees)
        assert [d["where"] for d in unseen["differences"]] == []
        await rebuild_mirror_tree(mtree, dst)
        seen = await verify_buckets(rig.name, rig.opts, index_path=index_path, trees=trees)
        assert seen["differences"] == [{"what": "missing in the mirror", "where": "t/06"}]
        assert seen["candidates_not_confirmed"] == 0
        mtree.close()

        # no persisted trees: today's full rebuild from listings
        full = await verify_buckets(
            rig.name, rig.opts, index_path=index_path, trees=(tmp_path / "no", tmp_path / "ne")
        )
        assert "from_trees" not in full
        assert {d["where"] for d in full["differences"]} == {"t/06"}
    finally:
        await src.aclose()
        await dst.aclose()
