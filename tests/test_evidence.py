"""The evidence log: every changed byte, removed or reordered entry is found; the store
refuses overwrites, and Object Lock refuses deletes where the bucket has it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiobotocore.session
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import AgentConfig
from agent.evidence import EvidenceLog, check_chain, digest, entry_key
from agent.evidence.chain import genesis, make_entry


def small_log(n: int = 3) -> tuple[list[tuple[str, bytes]], Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    _, raw = genesis("r1", 1000.0, key)
    items = [(entry_key("r1", 0), raw)]
    for seq in range(1, n):
        _, raw = make_entry(
            region="r1", seq=seq, prev=digest(items[-1][1]), time=1000.0 + seq,
            kind="drill.restore", data={"ok": True, "rto_seconds": 1.5 + seq, "note": "é"}, key=key,
        )  # fmt: skip
        items.append((entry_key("r1", seq), raw))
    return items, key


def test_intact_log_verifies() -> None:
    items, key = small_log()
    report = check_chain("r1", items, public=key.public_key())
    assert report.ok, report.problems
    assert report.head == (2, digest(items[-1][1]))


def test_every_changed_byte_is_found() -> None:
    items, key = small_log()
    positions = 0
    for index, (name, raw) in enumerate(items):
        for pos in range(len(raw)):
            for flip in (0x01, 0x20):
                changed = bytearray(raw)
                changed[pos] ^= flip
                tampered = list(items)
                tampered[index] = (name, bytes(changed))
                report = check_chain("r1", tampered, public=key.public_key())
                assert not report.ok, f"entry {index} byte {pos} ^ {flip:#x} went unnoticed"
                positions += 1
    assert positions == 2 * sum(len(raw) for _, raw in items)


def test_changed_byte_is_found_without_a_pinned_key() -> None:
    items, _ = small_log()
    for index in range(len(items)):
        name, raw = items[index]
        for pos in range(0, len(raw), 7):
            changed = bytearray(raw)
            changed[pos] ^= 0x01
            tampered = [*items[:index], (name, bytes(changed)), *items[index + 1 :]]
            assert not check_chain("r1", tampered).ok, (index, pos)


def test_removed_entry_is_found() -> None:
    items, key = small_log(4)
    report = check_chain("r1", [items[0], items[1], items[3]], public=key.public_key())
    assert any("missing" in p["what"] for p in report.problems)


def test_removed_tail_is_found_against_the_known_head() -> None:
    items, key = small_log(4)
    head = (3, digest(items[3][1]))
    assert check_chain("r1", items[:3], public=key.public_key()).ok  # nothing to tell
    report = check_chain("r1", items[:3], public=key.public_key(), head=head)
    assert any("tail removed" in p["what"] for p in report.problems)


def test_reordered_entries_are_found() -> None:
    items, key = small_log(4)
    swapped = [items[0], (items[1][0], items[2][1]), (items[2][0], items[1][1]), items[3]]
    report = check_chain("r1", swapped, public=key.public_key())
    whats = " ".join(p["what"] for p in report.problems)
    assert "reordered" in whats and "chain broken" in whats


def test_a_log_re_signed_by_another_key_fails_against_the_pinned_key() -> None:
    _, key = small_log()
    forged, _ = small_log()
    assert check_chain("r1", forged).ok  # self-consistent...
    report = check_chain("r1", forged, public=key.public_key())  # ...but not the region's key
    assert not report.ok


@pytest.mark.lab
async def test_appends_chain_and_refuse_overwrite(
    cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    cfg = cfg_b.model_copy(update={"region": unique, "data_dir": tmp_path})
    first, second = await EvidenceLog.open(cfg), await EvidenceLog.open(cfg)
    try:
        # two writers with the same key race: create-only puts keep both entries
        await asyncio.gather(
            first.append("verification", {"ok": True, "n": 1}),
            second.append("verification", {"ok": True, "n": 2}),
        )
        await first.append("key.rotation", {"key": "b", "key_id": "k-1"})
        report = await first.verify()
        assert report.ok, report.problems
        assert [e["seq"] for e in report.entries] == [0, 1, 2, 3]
        assert sorted(e["data"].get("n", 0) for e in report.entries) == [0, 0, 1, 2]
        # a changed entry in the store is found
        key = entry_key(unique, 2)
        raw = await first.store.get(key)
        await first.store.delete(key)
        await first.store.put(key, raw.replace(b'"ok":true', b'"ok":false'))
        report = await first.verify()
        assert [p["where"] for p in report.problems] == [key, entry_key(unique, 3)]
    finally:
        await first.aclose()
        await second.aclose()


@pytest.mark.lab
async def test_agents_of_one_region_share_its_signing_key(
    cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    """Two agents of a region with their own data directories (a replaced node, say) sign
    with ``report_signing_key``, so the region's chain stays verifiable."""
    shared = tmp_path / "region-key"
    configs = [
        cfg_b.model_copy(
            update={"region": unique, "data_dir": tmp_path / d, "report_signing_key": shared}
        )
        for d in ("node-1", "node-2")
    ]
    assert configs[0].signing_key_path == shared
    default = cfg_b.model_copy(update={"data_dir": tmp_path / "x", "report_signing_key": None})
    assert default.signing_key_path == tmp_path / "x" / "report-signing.key"
    logs = [await EvidenceLog.open(c) for c in configs]
    try:
        await logs[0].append("verification", {"ok": True, "node": 1})
        await logs[1].append("verification", {"ok": True, "node": 2})
        report = await logs[1].verify()
        assert report.ok, report.problems
        assert [e["data"].get("node") for e in report.entries] == [None, 1, 2]
    finally:
        for log in logs:
            await log.aclose()


@pytest.mark.lab
async def test_object_lock_refuses_deleting_an_entry(
    cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    bucket = f"ev-{unique}"[:63]
    vault = cfg_b.vault.model_copy(update={"bucket": bucket})
    session = aiobotocore.session.get_session()
    creds = {
        "aws_access_key_id": vault.access_key.reveal(),
        "aws_secret_access_key": vault.secret_key.reveal(),
    }
    async with session.create_client("s3", endpoint_url=vault.endpoint, **creds) as s3:
        await s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
        cfg = cfg_b.model_copy(update={"region": unique, "data_dir": tmp_path, "vault": vault})
        log = await EvidenceLog.open(cfg)
        try:
            await log.append("drill.restore", {"ok": True, "rto_seconds": 2.0})
            assert await log.lock_enabled()
            key = entry_key(unique, 1)
            head = await s3.head_object(Bucket=bucket, Key=key)
            assert head["ObjectLockMode"] == "COMPLIANCE"
            with pytest.raises(Exception, match="AccessDenied"):
                await s3.delete_object(Bucket=bucket, Key=key, VersionId=head["VersionId"])
            # without a version id only a delete marker is added: verify reports the removal
            await s3.delete_object(Bucket=bucket, Key=key)
            report = await log.verify()
            assert any("tail removed" in p["what"] for p in report.problems)
            versions = await s3.list_object_versions(Bucket=bucket, Prefix=key)
            kept = [v for v in versions["Versions"] if v["VersionId"] == head["VersionId"]]
            body = await s3.get_object(Bucket=bucket, Key=key, VersionId=head["VersionId"])
            async with body["Body"] as stream:
                assert json.loads(await stream.read())["seq"] == 1 and kept
        finally:
            await log.aclose()
