"""Artifacts from a model store under an S3 prefix (region a's real SeaweedFS) to region b."""

from __future__ import annotations

import asyncio
import hashlib
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import tomli_w

from agent.config import AgentConfig, ConfigError, S3Config, StreamConfig, load_config
from agent.lab import DATA_BUCKET, Lab
from agent.lab.stream_rig import lab_shipper, lab_sink
from benchmarks.artifacts import changed, tensors, write_version
from replicators.artifacts.kind import verify
from replicators.artifacts.modelstore import Changed
from replicators.artifacts.options import ArtifactsOptions
from replicators.artifacts.packs import open_pack_store
from replicators.artifacts.prefix import RANGE, PrefixStore, parse_key
from replicators.artifacts.source import ArtifactsSource
from replicators.artifacts.target import ArtifactsTarget
from replicators.keys import KeyProvider, build_key_provider
from replicators.s3 import S3Store
from replicators.shipper import Shipper
from replicators.vault import Vault

pytestmark = pytest.mark.lab
MiB = 1 << 20


@dataclass
class Rig:
    stream: str
    models: S3Config
    """Region a's model store: the data bucket under a prefix of this test's own."""
    bucket: S3Store
    vault: Vault
    send_keys: KeyProvider
    recv_keys: KeyProvider
    workdir: Path

    def source(self) -> ArtifactsSource:
        options = ArtifactsOptions(
            root=self.workdir / "unused", s3=self.models, marker="_COMPLETE", scan_interval=0.2
        )
        return ArtifactsSource(
            self.stream, options, self.vault.store, self.send_keys, self.workdir / "a"
        )

    def shipper(self, source: ArtifactsSource) -> Shipper:
        return lab_shipper(
            self.stream, "artifacts", source, self.vault, self.send_keys,
            self.workdir / "a" / "shipped.json", max_age=0.2,
        )  # fmt: skip

    async def apply(self) -> ArtifactsTarget:
        options = ArtifactsOptions(root=self.workdir / "dst", marker="_COMPLETE", watch=False)
        target = ArtifactsTarget(options, self.vault.store, self.recv_keys, self.workdir / "b")
        sink = lab_sink(self.stream, "artifacts", target, self.vault, self.recv_keys)
        await sink.recover()
        await sink.sync_once(asyncio.Event())
        return target

    async def upload(self, local: Path, model: str, version: str, marker: bool = True) -> None:
        """Put a version written locally under ``<prefix><model>/<version>/``."""
        for path in sorted(p for p in local.rglob("*") if p.is_file()):  # noqa: ASYNC240
            key = f"{model}/{version}/{path.relative_to(local).as_posix()}"
            await self.bucket.put(key, path.read_bytes())
        if marker:
            await self.bucket.put(f"{model}/{version}/_COMPLETE", b"")


@pytest_asyncio.fixture(loop_scope="session")
async def rig(
    cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> AsyncIterator[Rig]:
    models = cfg_a.vault.model_copy(update={"bucket": DATA_BUCKET, "prefix": f"models/{unique}/"})
    bucket = await S3Store.open(models)
    store = await open_pack_store(cfg_a.peers[0].vault)
    send, recv = build_key_provider(cfg_a.peers[0].keys), build_key_provider(cfg_b.keys)
    try:
        yield Rig(unique, models, bucket, Vault(store), send, recv, tmp_path)
    finally:
        await send.aclose()
        await recv.aclose()
        await store.aclose()
        await bucket.aclose()


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


async def ship(shipper: Shipper) -> None:
    async with asyncio.timeout(120):
        assert await shipper.sync_once(asyncio.Event())


async def test_a_version_under_a_prefix_arrives_identical_and_the_next_one_dedups(
    rig: Rig, lab: Lab
) -> None:
    # given two versions of a 40 MiB checkpoint under the prefix (multipart objects, several
    # read ranges each), the second with 10 % of its tensors rewritten
    size = 40 * MiB
    v1, v2 = rig.workdir / "v1", rig.workdir / "v2"
    write_version(v1, size)
    write_version(v2, size, changed(tensors(size), 0.10, seed=3))
    assert size > 4 * RANGE
    await rig.upload(v1, "llama", "v1")
    source = rig.source()
    shipper = rig.shipper(source)
    await shipper.recover()

    # when the first is shipped and applied, then it is materialized bit-identical
    await ship(shipper)
    await rig.apply()
    want = digests(v1) | {"_COMPLETE": hashlib.sha256(b"").hexdigest()}
    assert digests(rig.workdir / "dst" / "llama" / "v1") == want

    # when the second is shipped, only its changed chunks travel, and it arrives identical
    await rig.upload(v2, "llama", "v2")
    sent_before = source.bytes_sent
    await ship(shipper)
    sent = source.bytes_sent - sent_before
    assert 0.05 * size <= sent <= 0.20 * size, f"sent {sent} of {size} bytes"
    await rig.apply()
    want = digests(v2) | {"_COMPLETE": hashlib.sha256(b"").hexdigest()}
    assert digests(rig.workdir / "dst" / "llama" / "v2") == want
    assert set(source.index.shipped()) == {("llama", "v1"), ("llama", "v2")}
    await source.aclose()

    # when the active side verifies, then the roots it re-reads from the prefix match the
    # manifests in region b's vault
    report = await verify(*active_stream(lab, rig))
    assert report["ok"], report["differences"]
    assert report["counts"] == {"a": 2, "b": 2}
    assert report["stats"]["versions_reread"] == 2


def active_stream(lab: Lab, rig: Rig) -> tuple[StreamConfig, AgentConfig]:
    """Region a's configuration with this test's stream reading the prefix."""
    data = tomllib.loads(lab.config_path("a").read_text())
    s3 = dict(data["vault"], bucket=rig.models.bucket, prefix=rig.models.prefix)
    artifacts = {"root": str(rig.workdir / "unused"), "marker": "_COMPLETE", "s3": s3}
    data["streams"] = [{"name": rig.stream, "kind": "artifacts", "artifacts": artifacts}]
    data["data_dir"] = str(rig.workdir / "agent-a")
    path = rig.workdir / "a.toml"
    path.write_text(tomli_w.dumps(data))
    cfg = load_config(path)
    return cfg.streams[0], cfg


async def test_a_version_without_its_marker_is_not_taken_until_the_marker_arrives(
    rig: Rig,
) -> None:
    # given a version whose files are all there but whose marker is not, and a staging key
    local = rig.workdir / "bert"
    write_version(local, 2 * MiB)
    await rig.upload(local, "bert", "3", marker=False)
    await rig.bucket.put("bert/3/.staging/part-0", b"in progress")
    source = rig.source()
    await source.resume(0)
    stop = asyncio.Event()
    task = asyncio.create_task(source.next_batch(1 << 20, 0.2, stop))

    # when the source has listed the prefix several times, then nothing was taken
    await asyncio.sleep(1.5)
    assert not task.done()
    assert source.index.shipped() == {}

    # when the marker is written, then the version is taken, without the staging key
    await rig.bucket.put("bert/3/_COMPLETE", b"")
    async with asyncio.timeout(60):
        batch = await task
    assert len(batch) == 1
    assert ("bert", "3") in source.index.shipped()
    [version] = await PrefixStore.scan(source.models)  # type: ignore[arg-type]
    assert [f.path for f in version.files] == ["_COMPLETE", "config.json", "model.safetensors"]
    await source.aclose()


async def test_an_object_rewritten_while_it_is_read_is_reported_changed(rig: Rig) -> None:
    # given an object of three ranges, listed, and a reader that has read the first range
    await rig.bucket.put("gpt/1/weights.bin", b"a" * (2 * RANGE + 5))
    store = await PrefixStore.open(rig.models)
    try:
        [version] = await store.scan()
        [info] = version.files
        reader = store.reader(version, info)
        buffer = memoryview(bytearray(RANGE))
        assert await asyncio.to_thread(reader.readinto, buffer) == RANGE

        # when the object is rewritten, then the next read says so
        await rig.bucket.put("gpt/1/weights.bin", b"b" * (2 * RANGE + 5))
        with pytest.raises(Changed):
            while await asyncio.to_thread(reader.readinto, buffer):
                pass
        reader.close()
    finally:
        await store.aclose()


def test_keys_that_are_not_files_of_a_version_are_skipped() -> None:
    assert parse_key("llama/v1/model.safetensors") == ("llama", "v1", "model.safetensors")
    assert parse_key("llama/v1/tokenizer/vocab.json") == ("llama", "v1", "tokenizer/vocab.json")
    for key in ("llama/v1/", "llama/v1", "llama/v1/.tmp/x", "llama/.v1/a", "../v1/a", "a/b//c"):
        assert parse_key(key) is None, key


def test_config_errors_name_the_file_the_key_and_what_was_expected(
    lab: Lab, tmp_path: Path
) -> None:
    base = tomllib.loads(lab.config_path("a").read_text())
    cases = {
        "streams[models].artifacts.s3.bucket": {"endpoint": "http://127.0.0.1:1"},
        "must end with '/'": {"bucket": "data", "prefix": "models"},
    }
    for expected, s3 in cases.items():
        base["streams"] = [
            {"name": "models", "kind": "artifacts", "artifacts": {"root": "/srv/m", "s3": s3}}
        ]
        path = tmp_path / "agent.toml"
        path.write_text(tomli_w.dumps(base))
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert str(path) in str(caught.value) and expected in str(caught.value), caught.value
    base["streams"][0]["artifacts"]["s3"] = {"bucket": "data", "prefix": "models/"}
    path.write_text(tomli_w.dumps(base))
    options = load_config(path).streams[0].artifacts
    assert options is not None and options.s3 is not None and options.s3.prefix == "models/"
