"""``dragent rekey`` after a KEK compromise, and revoking the compromised version.

The lab test seals 1,000 small segments (plus a base backup's pack and manifest and an
artifacts pack) into a vault bucket with Object Lock, rotates the key file, runs
``python -m agent rekey`` as a subprocess, kills it with SIGKILL halfway, reruns it to
completion and checks that every object was re-keyed exactly once (two versions each:
the locked original and the overwrite), opens under the new version with the same
records and header fields, and that once the old version is revoked, what it wrapped is
refused with an error naming it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from agent.lab import Lab
from agent.rekey import TMP_PREFIX, state_path
from replicators.artifacts.packs import PackRef, seal_pack
from replicators.errors import KeyAccessError
from replicators.keys import (
    LocalKeyProvider,
    generate_key_file,
    revoke_key_version,
    rotate_key_file,
    unseal,
)
from replicators.postgres.backupchunks import pack_key, seal_put, sealed_name
from replicators.s3 import S3Store, s3_client
from replicators.segment import SegmentHeader, read_header, seal
from replicators.settings import S3Config
from replicators.vault import SegmentRef, Vault

SEGMENTS = 1000


# -- the key file's revoked list -------------------------------------------------------------


async def test_a_revoked_version_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "kek.key"
    old = generate_key_file(path)
    keys = LocalKeyProvider(path)
    try:
        data = await keys.data_key()
        assert data.key_id == old
        with pytest.raises(KeyAccessError, match="is the current key"):
            revoke_key_version(path, old)
        new = rotate_key_file(path)
        assert revoke_key_version(path, old) and not revoke_key_version(path, old)
        with pytest.raises(KeyAccessError, match=f"key version '{old}' is revoked"):
            await keys.unwrap(old, data.wrapped)  # even though it was cached
        fresh = LocalKeyProvider(path)
        with pytest.raises(KeyAccessError, match=f"key version '{old}' is revoked"):
            await fresh.unwrap(old, data.wrapped)
        await fresh.aclose()
        assert (await keys.data_key()).key_id == new
        newer = rotate_key_file(path)  # a rotation keeps the revoked list
        assert json.loads(path.read_text())["revoked"] == [old]
        assert json.loads(path.read_text())["current"] == newer
        with pytest.raises(KeyAccessError, match="not in key file"):
            revoke_key_version(path, "k-nope")
    finally:
        await keys.aclose()


# -- on the lab --------------------------------------------------------------------------------


def _config(lab: Lab, tmp_path: Path, bucket: str, key_file: Path) -> Path:
    data: dict[str, Any] = tomllib.loads(lab.config_path("b").read_text())
    data["data_dir"] = str(tmp_path / "agent")
    data["vault"]["bucket"] = bucket
    data["vault"]["object_lock"] = {"mode": "GOVERNANCE", "retain": "1d"}
    data["keys"] = {"provider": "local", "key_file": str(key_file)}
    data["streams"] = []
    data["peers"] = []
    path = tmp_path / "b.toml"
    path.write_text(tomli_w.dumps(data))
    return path


async def _seal_many(vault: Vault, keys: LocalKeyProvider, stream: str) -> dict[str, Any]:
    """1,000 segments, a backup (pack + manifest) and an artifacts pack; the Merkle root
    and header of each, by key."""
    made: dict[str, Any] = {}
    limit = asyncio.Semaphore(32)

    async def one(seq: int) -> None:
        records = [f"{stream} record {seq}.{i}".encode() * 3 for i in range(4)]
        blob = seal(
            records, stream=stream, epoch=1, seq=seq, start=str(seq * 4), end=str(seq * 4 + 4),
            first_source_time=1000.0 + seq, last_source_time=1000.5 + seq,
            data_key=await keys.data_key(), created_at=2000.0 + seq, frame_size=256,
        )  # fmt: skip
        ref = SegmentRef(1, seq, stream)
        async with limit:
            await vault.put_segment(ref, blob)
        made[ref.key] = read_header(blob)

    await asyncio.gather(*(one(seq) for seq in range(SEGMENTS)))
    backup = "20261206T120000Z"
    for n, key in (
        (1, pack_key(stream, backup, 1)),
        (0, f"backups/{stream}/{backup}/manifest.seg"),
    ):
        blob, _ = await seal_put(
            vault.store, keys, key, sealed_name(stream, backup), n, f"backup part {n}".encode() * 50
        )
        made[key] = read_header(blob)
    pack = PackRef(stream, "w1", 1)
    blob = seal_pack(pack, [b"chunk one", b"chunk two"], await keys.data_key())
    await vault.put_blob(pack.key, blob)
    made[pack.key] = read_header(blob)
    return made


async def _rekey(config: Path, stream: str, old: str, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "rekey", "--config", str(config), "--stream", stream,
        "--from", old, "--json", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _versions(cfg: S3Config, prefix: str) -> tuple[Counter[str], list[dict[str, Any]]]:
    counts: Counter[str] = Counter()
    every: list[dict[str, Any]] = []
    async with s3_client(cfg) as s3:
        pages = s3.get_paginator("list_object_versions").paginate(Bucket=cfg.bucket, Prefix=prefix)
        async for page in pages:
            for v in page.get("Versions", []):
                counts[v["Key"]] += 1
                every.append(v)
            for m in page.get("DeleteMarkers", []):
                every.append(m | {"marker": True})
    return counts, every


async def _old_version_blob(cfg: S3Config, key: str, version: str) -> bytes:
    async with s3_client(cfg) as s3:
        out = await s3.get_object(Bucket=cfg.bucket, Key=key, VersionId=version)
        async with out["Body"] as body:
            return bytes(await body.read())


def _same_fields(a: SegmentHeader, b: SegmentHeader) -> bool:
    fields = (
        "stream", "epoch", "seq", "start", "end", "first_source_time", "last_source_time",
        "record_count", "created_at", "frame_size",
    )  # fmt: skip
    return all(getattr(a, f) == getattr(b, f) for f in fields)


@pytest.mark.lab
async def test_rekey_survives_sigkill_and_revokes_the_old_version(
    lab: Lab, tmp_path: Path, unique: str
) -> None:
    stream = unique[:30].strip("-")
    key_file = tmp_path / "kek.key"
    old = generate_key_file(key_file)
    bucket = f"rekey-{time.time_ns() % 10**12}"
    config = _config(lab, tmp_path, bucket, key_file)
    from agent.config import load_config

    cfg = load_config(config)
    async with s3_client(cfg.vault) as s3:
        await s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    store = await S3Store.open(cfg.vault)
    keys = LocalKeyProvider(key_file)
    try:
        made = await _seal_many(Vault(store), keys, stream)
        total = len(made)
        new = rotate_key_file(key_file)

        # the first run, killed with SIGKILL once about half is done
        state = state_path(cfg.data_dir, cfg.region, stream, old)
        first = await _rekey(config, stream, old)
        saved: dict[str, Any] = {}
        async with asyncio.timeout(120):
            while first.returncode is None:
                try:
                    saved = json.loads(state.read_text())
                except (FileNotFoundError, ValueError):
                    saved = {}
                if saved.get("counts", {}).get("rekeyed", 0) >= total // 2:
                    first.send_signal(signal.SIGKILL)
                    break
                await asyncio.sleep(0.01)
            await first.wait()
        assert first.returncode == -signal.SIGKILL, (await first.stderr.read()).decode()[-2000:]
        killed = json.loads(state.read_text())
        under_new = 0
        for key in made:
            under_new += read_header(await store.get(key)).key_id == new
        assert 0 < under_new < total, under_new

        # the rerun continues and completes
        t0 = time.monotonic()
        second = await _rekey(config, stream, old)
        out, err = await second.communicate()
        wall = time.monotonic() - t0
        assert second.returncode == 0, err.decode()[-3000:]
        (report,) = json.loads(out)["reports"]
        assert report["complete"] and not report["failed"]
        assert report["resumed_after"] is not None
        assert report["total"]["rekeyed"] + report["counts"].get("already", 0) == total
        assert report["counts"].get("other_key", 0) == 0
        # the rerun took up exactly where the saved state left off: nothing done twice,
        # nothing skipped; what the killed run finished after its last save is found
        # already re-keyed by its key id (at most the objects that were in flight)
        assert sum(report["counts"].values()) == total - sum(killed["counts"].values())
        assert report["counts"].get("already", 0) <= 8
        assert report["locked_versions"] == report["total"]["rekeyed"]  # old versions stay locked
        assert report["locked_until"] is not None
        rate = report["per_second"]
        print(
            f"\nrekey throughput on the lab: {rate:.0f} objects/s in the rerun "
            f"({report['counts']['rekeyed']} re-keyed in {report['seconds']:.2f} s; "
            f"process wall time {wall:.2f} s)"
        )

        # every object: re-keyed exactly once (two versions), under the new key, same content
        counts, versions = await _versions(cfg.vault, "")
        for key in made:
            assert counts[key] == 2, (key, counts[key])
        assert not [v for v in versions if v["Key"].startswith(TMP_PREFIX)]
        check = LocalKeyProvider(key_file)
        try:
            for key, header in made.items():
                blob = await store.get(key)
                opened = await unseal(
                    blob, check, expect_stream=header.stream, expect_seq=header.seq
                )
                assert opened.header.key_id == new
                assert _same_fields(opened.header, header), key
                assert opened.header.salt != header.salt
        finally:
            await check.aclose()

        # a third run with --revoke: nothing left to do; the old version is revoked
        third = await _rekey(config, stream, old, "--revoke")
        out, err = await third.communicate()
        assert third.returncode == 0, err.decode()[-3000:]
        doc = json.loads(out)
        assert doc["reports"][0]["counts"] == {} and doc["revoked"].startswith(f"{old} revoked")
        assert json.loads(key_file.read_text())["revoked"] == [old]

        # an old version (still in the bucket under Object Lock) no longer opens
        key = SegmentRef(1, 7, stream).key
        oldest = min((v for v in versions if v["Key"] == key), key=lambda v: v["LastModified"])
        blob = await _old_version_blob(cfg.vault, key, oldest["VersionId"])
        assert read_header(blob).key_id == old
        after = LocalKeyProvider(key_file)
        try:
            with pytest.raises(KeyAccessError, match=f"key version '{old}' is revoked"):
                await unseal(blob, after)
            assert (await unseal(await store.get(key), after)).header.key_id == new
        finally:
            await after.aclose()
    finally:
        await keys.aclose()
        await store.aclose()
