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
from tests.test_objects_rig import Rig, options, snapshot

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
        async with rig.running():
            await eventually(lambda: _same(src, dst), within=60, every=0.5)
            for i in range(0, 30, 3):
                await src.write(f"small/{i:03d}", b"v2-" + os.urandom(50), "text/csv", {"v": "2"})
            for i in range(1, 30, 5):
                await src.delete(f"small/{i:03d}")
            await src.write("big/one.bin", os.urandom(6 * 1024 * 1024), "", {})
            await eventually(lambda: _same(src, dst), within=60, every=0.5)
        head = await dst.head("small/000")
        assert head.metadata[META_HASH] == content_hash(await src.read("small/000", ""))
        assert head.metadata[META_VERSION]
    finally:
        await src.aclose()
        await dst.aclose()


async def _same(src: object, dst: object) -> bool:
    a = await snapshot(src)  # type: ignore[arg-type]
    b = await snapshot(dst)  # type: ignore[arg-type]
    return a == b and len(a) > 0
