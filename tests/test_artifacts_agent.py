"""Artifacts through real agent processes: kill -9 mid-upload, then a restart."""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import tomli_w

from agent.agentproc import AgentProcess
from agent.config import load_config
from agent.lab import Lab
from replicators.artifacts.packs import PackRef, open_pack, packs_prefix
from replicators.keys import build_key_provider
from replicators.s3 import S3Store
from tests.support import eventually, lab_agent
from tests.test_artifacts_pipeline import publish, same_tree

pytestmark = pytest.mark.lab
MiB = 1 << 20


def config(lab: Lab, region: str, workdir: Path, stream: str, root: Path) -> Path:
    data = tomllib.loads(lab.config_path(region).read_text())
    data["data_dir"] = str(workdir / region)
    artifacts: dict[str, Any] = {
        "root": str(root),
        "marker": "_COMPLETE",
        "scan_interval": "500ms",
        "chunk_min": "64KiB",
        "chunk_avg": "256KiB",
        "chunk_max": "1MiB",
        "pack_size": "1MiB",
        "uploads": 2,
    }
    data["streams"] = [{"name": stream, "kind": "artifacts", "artifacts": artifacts}]
    path = workdir / f"{region}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


class Pair:
    def __init__(self, lab: Lab, workdir: Path, stream: str) -> None:
        self.lab, self.workdir, self.stream = lab, workdir, stream
        self.src, self.dst = workdir / "src", workdir / "dst"
        self.a = self.agent("a", self.src)
        self.b = self.agent("b", self.dst)

    def agent(self, region: str, root: Path) -> AgentProcess:
        cfg = config(self.lab, region, self.workdir, self.stream, root)
        return lab_agent(self.lab, region, cfg, self.workdir)


@pytest_asyncio.fixture(loop_scope="session")
async def pair(lab: Lab, tmp_path: Path, unique: str) -> AsyncIterator[Pair]:
    p = Pair(lab, tmp_path, unique)
    try:
        yield p
    finally:
        await p.a.stop(grace=10)
        await p.b.stop(grace=10)


async def vault_keys(lab: Lab, prefix: str) -> list[str]:
    store = await S3Store.open(load_config(lab.config_path("b")).vault)
    try:
        return [i.key async for i in store.list(prefix)]
    finally:
        await store.aclose()


async def chunks_per_pack(lab: Lab, stream: str) -> dict[str, list[bytes]]:
    """Every pack in b's vault, opened with b's key: the SHA-256 of each chunk it holds."""
    cfg = load_config(lab.config_path("b"))
    store = await S3Store.open(cfg.vault)
    keys = build_key_provider(cfg.keys)
    out = {}
    try:
        async for info in store.list(packs_prefix(stream)):
            opened = await open_pack(PackRef.parse(info.key), await store.get(info.key), keys)
            out[info.key] = [hashlib.sha256(r).digest() for r in opened.records]
    finally:
        await keys.aclose()
        await store.aclose()
    return out


async def test_kill_9_during_an_upload_resumes_without_resending_chunks(pair: Pair) -> None:
    version = publish(pair.src, "llama", "v1", 64 * MiB)
    await pair.b.start()
    await pair.b.wait_ready()
    await pair.a.start()
    packs = packs_prefix(pair.stream)

    async def some_packs_published() -> bool:
        return len(await vault_keys(pair.lab, packs)) >= 6

    await eventually(some_packs_published, within=120, every=0.05)
    await pair.a.kill()  # kill -9 in the middle of the version's upload
    before = set(await vault_keys(pair.lab, packs))
    assert not await vault_keys(pair.lab, f"streams/{pair.stream}/")  # no manifest yet

    await pair.a.start()
    target = pair.dst / "llama" / "v1"
    await eventually(lambda: (target / "_COMPLETE").exists(), within=180, every=0.2)
    assert same_tree(version, target)
    contents = await chunks_per_pack(pair.lab, pair.stream)
    assert before <= set(contents)  # every pack published before the kill is kept and used
    every = [c for chunks in contents.values() for c in chunks]
    assert len(every) == len(set(every))  # no chunk was sent twice
