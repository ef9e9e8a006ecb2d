"""Artifacts end to end in-process: source → region b's real vault (SeaweedFS) → target."""

from __future__ import annotations

import asyncio
import filecmp
import hashlib
import json
import os
import re
import resource
import shutil
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from agent.config import AgentConfig, StreamConfig, load_config
from agent.lab import Lab
from agent.lab.stream_rig import lab_shipper, lab_sink
from benchmarks.artifacts import changed, tensors, write_checkpoint, write_version
from replicators.artifacts.gc import collect
from replicators.artifacts.kind import verify
from replicators.artifacts.options import ArtifactsOptions
from replicators.artifacts.packs import packs_prefix
from replicators.artifacts.restore import catalogue, find
from replicators.artifacts.source import ArtifactsSource
from replicators.artifacts.target import ArtifactsTarget
from replicators.errors import IntegrityError
from replicators.keys import KeyProvider, build_key_provider
from replicators.metrics import Metrics
from replicators.s3 import S3Store
from replicators.shipper import Shipper
from replicators.sink import Sink
from replicators.vault import Vault

pytestmark = pytest.mark.lab
MiB = 1 << 20


@dataclass
class Rig:
    stream: str
    vault: Vault
    send_keys: KeyProvider
    recv_keys: KeyProvider
    workdir: Path
    metrics: Metrics

    @property
    def src(self) -> Path:
        return self.workdir / "src"

    @property
    def dst(self) -> Path:
        return self.workdir / "dst"

    def options(self, root: Path) -> ArtifactsOptions:
        return ArtifactsOptions(root=root, marker="_COMPLETE", scan_interval=0.2, watch=False)

    def shipper(self) -> Shipper:
        source = ArtifactsSource(
            self.stream,
            self.options(self.src),
            self.vault.store,
            self.send_keys,
            self.workdir / "a",
        )
        return lab_shipper(
            self.stream, "artifacts", source, self.vault, self.send_keys,
            self.workdir / "a" / "shipped.json", self.metrics, max_age=0.2,
        )  # fmt: skip

    def sink(self) -> tuple[Sink, ArtifactsTarget]:
        target = ArtifactsTarget(
            self.options(self.dst), self.vault.store, self.recv_keys, self.workdir / "b"
        )
        sink = lab_sink(self.stream, "artifacts", target, self.vault, self.recv_keys, self.metrics)
        return sink, target

    async def stored(self, prefix: str) -> int:
        return sum([i.size async for i in self.vault.store.list(prefix)])


@pytest_asyncio.fixture(loop_scope="session")
async def rig(
    cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> AsyncIterator[Rig]:
    peer_b = cfg_a.peers[0]
    store = await S3Store.open(peer_b.vault)
    send, recv = build_key_provider(peer_b.keys), build_key_provider(cfg_b.keys)
    try:
        yield Rig(unique, Vault(store), send, recv, tmp_path, Metrics(CollectorRegistry()))
    finally:
        await send.aclose()
        await recv.aclose()
        await store.aclose()


def publish(
    root: Path, model: str, version: str, size: int, rewrite: set[str] | None = None
) -> Path:
    directory = root / model / version
    write_version(directory, size, rewrite)
    (directory / "_COMPLETE").write_bytes(b"")
    return directory


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    for name in cmp.common_files:
        x, y = (a / name).read_bytes(), (b / name).read_bytes()
        if hashlib.sha256(x).digest() != hashlib.sha256(y).digest():
            return False
        if (a / name).stat().st_mode != (b / name).stat().st_mode:
            return False
    return all(same_tree(a / d, b / d) for d in cmp.common_dirs)


async def ship_once(shipper: Shipper) -> None:
    stop = asyncio.Event()
    async with asyncio.timeout(120):
        assert await shipper.sync_once(stop)


async def apply_all(rig: Rig) -> ArtifactsTarget:
    sink, target = rig.sink()
    await sink.recover()
    await sink.sync_once(asyncio.Event())
    return target


@pytest.mark.parametrize(
    "size", [128 * MiB, pytest.param(1024 * MiB, marks=pytest.mark.soak, id="1GiB")]
)
async def test_second_version_ships_only_changed_chunks_and_arrives_identical(
    rig: Rig, size: int
) -> None:
    v1 = publish(rig.src, "llama", "v1", size)
    shipper = rig.shipper()
    await shipper.recover()
    await ship_once(shipper)
    packs_v1 = await rig.stored(packs_prefix(rig.stream))
    assert packs_v1 >= size  # random tensors do not compress
    await apply_all(rig)
    assert same_tree(v1, rig.dst / "llama" / "v1")

    rewrite = changed(tensors(size), 0.10, seed=3)
    v2 = publish(rig.src, "llama", "v2", size, rewrite)
    segments_before = await rig.stored(f"streams/{rig.stream}/")
    await ship_once(shipper)
    packs_v2 = await rig.stored(packs_prefix(rig.stream)) - packs_v1
    manifest_v2 = await rig.stored(f"streams/{rig.stream}/") - segments_before
    v2_size = sum(p.stat().st_size for p in v2.rglob("*") if p.is_file())
    shipped = packs_v2 + manifest_v2
    assert shipped <= 0.20 * v2_size, f"shipped {shipped} of {v2_size} bytes"
    assert shipped >= 0.05 * v2_size  # the changed tensors did travel
    target = await apply_all(rig)
    assert same_tree(v2, rig.dst / "llama" / "v2")
    assert same_tree(v1, rig.dst / "llama" / "v1")
    assert target.fetched_bytes <= 0.2 * v2_size  # unchanged chunks copied from v1 on disk
    applied = target.applied_manifest("llama", "v2")
    assert applied is not None and shipper.source.index.shipped()[("llama", "v2")][1] == (
        applied.root().hex()
    )


async def test_reapplying_after_a_crash_is_idempotent(rig: Rig) -> None:
    v1 = publish(rig.src, "bert", "1", 4 * MiB)
    shipper = rig.shipper()
    await shipper.recover()
    await ship_once(shipper)
    target = await apply_all(rig)
    target.state_path.unlink()  # crash after materializing, before recording the segment
    await apply_all(rig)
    assert same_tree(v1, rig.dst / "bert" / "1")
    assert [p.name for p in (rig.dst / "bert").iterdir()] == ["1"]  # no leftovers


def agent_config(rig: Rig, base: Path, root: Path) -> Path:
    import tomllib

    import tomli_w

    data = tomllib.loads(base.read_text())
    data["data_dir"] = str(rig.workdir / "agent-b")
    data["streams"] = [{"name": rig.stream, "kind": "artifacts", "artifacts": {"root": str(root)}}]
    path = rig.workdir / "b.toml"
    path.write_text(tomli_w.dumps(data))
    return path


async def run_cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args, stdout=PIPE, stderr=PIPE
    )
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode()


async def test_restore_command_and_a_corrupted_pack(rig: Rig, lab: Lab) -> None:
    v1 = publish(rig.src, "gpt", "7", 24 * MiB)
    shipper = rig.shipper()
    await shipper.recover()
    await ship_once(shipper)
    config = agent_config(rig, lab.config_path("b"), rig.dst)

    code, out = await run_cli(
        "restore", "artifacts", "--config", str(config), "--model", "gpt", "--version", "7",
        "--to", str(rig.workdir / "restored"),
    )  # fmt: skip
    assert code == 0, out
    assert same_tree(v1, rig.workdir / "restored")
    code, out = await run_cli("artifacts", "ls", "--config", str(config), "--json")
    assert code == 0, out
    listed = json.loads(out[: out.rindex("]") + 1])
    assert [(r["model"], r["version"], r["files"]) for r in listed] == [("gpt", "7", 3)]

    keys = [i.key async for i in rig.vault.store.list(packs_prefix(rig.stream))]
    assert len(keys) >= 2
    victim = keys[1]
    blob = bytearray(await rig.vault.store.get(victim))
    blob[len(blob) // 2] ^= 0x40
    await rig.vault.store.put(victim, bytes(blob))

    code, out = await run_cli(
        "restore", "artifacts", "--config", str(config), "--model", "gpt", "--version", "7",
        "--to", str(rig.workdir / "again"),
    )  # fmt: skip
    assert code == 1
    assert re.search(r"artifact gpt/7: file model.safetensors chunk \d+ \(offset \d+", out), out
    assert victim in out and "failed authentication" in out
    assert not (rig.workdir / "again").exists()

    sink, _ = rig.sink()
    await sink.recover()
    with pytest.raises(IntegrityError, match=r"artifact gpt/7: file model.safetensors chunk \d+"):
        await sink.sync_once(asyncio.Event())
    assert not (rig.dst / "gpt" / "7").exists()

    cfg = load_config(config)
    report = await verify(cfg.streams[0], cfg, deep=True)
    assert not report["ok"]
    damaged = [d for d in report["differences"] if d["what"] == "damaged chunk"]
    assert damaged and all(d["pack"] == victim for d in damaged)
    assert all(
        re.match(r"artifact gpt/7 file model.safetensors chunk \d+", d["where"]) for d in damaged
    )
    # the frame that failed maps to the few chunks it held, not the whole pack
    assert len(damaged) < len(await chunks_in(rig, victim))


async def chunks_in(rig: Rig, key: str) -> list[bytes]:
    known = await catalogue(rig.vault, rig.recv_keys, rig.stream)
    return [
        c.id for m in known.values() for f in m.files for c in f.chunks if m.packs[c.pack] == key
    ]


async def test_the_watch_finds_a_new_version_long_before_the_scan(rig: Rig) -> None:
    rig.src.mkdir(parents=True)
    options = ArtifactsOptions(root=rig.src, quiet_period=0.3, scan_interval=600, watch=True)
    source = ArtifactsSource(rig.stream, options, rig.vault.store, rig.send_keys, rig.workdir / "w")
    await source.resume(0)
    stop = asyncio.Event()
    task = asyncio.create_task(source.next_batch(1 << 20, 0.2, stop))
    await asyncio.sleep(0.5)  # the source is waiting: nothing to ship yet
    assert not task.done()
    write_version(rig.src / "t5" / "base", 2 * MiB)  # no marker: complete after the quiet period
    async with asyncio.timeout(30):
        batch = await task
    assert [len(c.payload) > 0 for c in batch] == [True]
    assert ("t5", "base") in source.index.shipped()
    await source.aclose()


async def test_gc_collects_unreferenced_packs_after_grace_never_during_an_upload(rig: Rig) -> None:
    version = publish(rig.src, "gc", "1", 6 * MiB)
    shipper = rig.shipper()
    await shipper.recover()
    await ship_once(shipper)
    first = {i.key async for i in rig.vault.store.list(packs_prefix(rig.stream))}
    write_checkpoint(version / "model.safetensors", 6 * MiB, seed=9)  # rewritten in place
    await ship_once(shipper)  # shipped again: the first packs are now unreferenced
    source = shipper.source
    assert isinstance(source, ArtifactsSource)
    index, store, keys = source.index, rig.vault.store, rig.send_keys

    known = await catalogue(rig.vault, rig.recv_keys, rig.stream)
    orphans = first - set(known[("gc", "1")].packs)  # the header and config chunks are shared
    assert orphans
    kept = await collect(store, keys, index, rig.stream, grace=3600)
    assert kept.deleted == [] and kept.young == len(orphans)
    index.begin_upload()  # an upload may reference any indexed chunk: hands off
    held = await collect(store, keys, index, rig.stream, grace=0)
    assert held.skipped and held.deleted == []
    index.end_upload()
    done = await collect(store, keys, index, rig.stream, grace=0)
    assert sorted(done.deleted) == sorted(orphans)
    left = {i.key async for i in rig.vault.store.list(packs_prefix(rig.stream))}
    assert left and not left & orphans
    await apply_all(rig)
    assert same_tree(version, rig.dst / "gc" / "1")


async def test_a_lost_source_index_is_rebuilt_from_the_destination(
    rig: Rig, cfg_a: AgentConfig
) -> None:
    publish(rig.src, "mistral", "1", 24 * MiB)
    first = rig.shipper()
    await first.recover()
    await ship_once(first)
    sent_first = first.source.bytes_sent
    await first.source.aclose()
    shutil.rmtree(rig.workdir / "a")  # the active region lost its state directory
    publish(rig.src, "mistral", "2", 24 * MiB, changed(tensors(24 * MiB), 0.10, seed=5))
    again = rig.shipper()
    await again.recover()  # position 1 from the vault; the index is rebuilt from manifests
    await ship_once(again)
    source = again.source
    assert isinstance(source, ArtifactsSource)
    assert 0 < source.bytes_sent < 0.5 * sent_first  # only v2's changed chunks travelled
    shipped = source.index.shipped()
    assert set(shipped) == {("mistral", "1"), ("mistral", "2")}
    target = await apply_all(rig)
    assert target.applied_manifest("mistral", "1") is not None  # v1 was not announced twice
    assert same_tree(rig.src / "mistral" / "2", rig.dst / "mistral" / "2")

    stream = StreamConfig(name=rig.stream, kind="artifacts", artifacts=rig.options(rig.src))
    data_dir = rig.workdir / "agent-a"
    (data_dir / "streams" / rig.stream).mkdir(parents=True)
    (data_dir / "streams" / rig.stream / "to-b").symlink_to(rig.workdir / "a")
    active = cfg_a.model_copy(update={"streams": [stream], "data_dir": data_dir})
    report = await verify(stream, active)
    assert report["ok"], report["differences"]
    assert report["counts"] == {"a": 2, "b": 2} and report["roots"]["a"] == report["roots"]["b"]
    assert report["stats"]["versions_reread"] == 0  # roots recorded when shipped
    deep = await verify(stream, active, deep=True)
    assert deep["ok"] and deep["stats"]["versions_reread"] == 2 and deep["stats"]["chunks_hashed"]
    (rig.src / "mistral" / "2" / "config.json").write_text("{}")  # changed after shipping
    changed_report = await verify(stream, active)
    assert not changed_report["ok"]
    assert [d["where"] for d in changed_report["differences"]] == ["mistral/2"]


async def test_a_deleted_version_is_removed_then_collected_after_retention(rig: Rig) -> None:
    old = publish(rig.src, "del", "1", 6 * MiB)
    publish(rig.src, "del", "2", 6 * MiB, changed(tensors(6 * MiB), 1.0, seed=1))
    shipper = rig.shipper()
    await shipper.recover()
    await ship_once(shipper)
    await apply_all(rig)
    assert (rig.dst / "del" / "1").is_dir()
    before = {i.key async for i in rig.vault.store.list(packs_prefix(rig.stream))}
    shutil.rmtree(old)
    await ship_once(shipper)  # a tombstone
    target = await apply_all(rig)
    assert not (rig.dst / "del" / "1").exists() and (rig.dst / "del" / "2").is_dir()
    assert target.applied_manifest("del", "1") is None
    kept = await find(rig.vault, rig.recv_keys, rig.stream, "del", "1")  # still restorable
    source = shipper.source
    assert isinstance(source, ArtifactsSource)
    args = (rig.vault.store, rig.send_keys, source.index, rig.stream)
    assert (await collect(*args, grace=0, retention=3600)).deleted == []
    done = await collect(*args, grace=0, retention=0)
    live = await catalogue(rig.vault, rig.recv_keys, rig.stream)
    assert set(done.deleted) == set(kept.packs) - set(live[("del", "2")].packs)
    assert done.deleted and set(done.deleted) <= before


async def test_an_empty_store_deletes_nothing(rig: Rig) -> None:
    publish(rig.src, "keep", "1", 1 * MiB)
    shipper = rig.shipper()
    await shipper.recover()
    await ship_once(shipper)
    shutil.rmtree(rig.src)  # an unmounted volume looks like this
    rig.src.mkdir()
    source = shipper.source
    assert isinstance(source, ArtifactsSource)
    stop = asyncio.Event()
    task = asyncio.create_task(source.next_batch(1 << 20, 0.2, stop))
    await asyncio.sleep(1.0)
    stop.set()
    async with asyncio.timeout(10):
        assert await task == []


async def test_more_files_than_may_be_open_at_once_and_modes_masked(rig: Rig) -> None:
    """Assembly opens one file at a time: a version with more files than RLIMIT_NOFILE
    allows this process to open arrives whole; a setuid bit shipped is not applied."""
    version = rig.src / "shards" / "v1"
    version.mkdir(parents=True)
    for i in range(300):
        (version / f"shard-{i:03d}.bin").write_bytes(i.to_bytes(2, "big") * 600)
    tool = version / "tool.sh"
    tool.write_bytes(b"#!/bin/sh\necho hello\n")
    tool.chmod(0o4755)
    (version / "_COMPLETE").write_bytes(b"")
    shipper = rig.shipper()
    await shipper.recover()
    await ship_once(shipper)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 64, hard))  # fewer than 301 files
    try:
        await apply_all(rig)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    arrived = rig.dst / "shards" / "v1"
    assert len(list(arrived.glob("shard-*.bin"))) == 300
    assert (arrived / "shard-299.bin").read_bytes() == (299).to_bytes(2, "big") * 600
    assert (arrived / "tool.sh").stat().st_mode & 0o7777 == 0o755
