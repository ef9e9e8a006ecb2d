"""The evidence log: every changed byte, removed or reordered entry is found; the store
refuses overwrites, and Object Lock refuses deletes where the bucket has it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiobotocore.session
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import AgentConfig
from agent.evidence import EvidenceLog, check_chain, digest, entry_key
from agent.evidence.chain import (
    KEY_CHANGE,
    SigningKeyError,
    follow,
    genesis,
    key_change_data,
    make_entry,
)
from agent.evidence.keys import install_private_key, read_private_key, same_key
from verifiers.report import key_id, load_public_key


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


# -- the signing key: introduced in the chain, changed only by the current key --------------


def extend(
    items: list[tuple[str, bytes]], key: Ed25519PrivateKey, kind: str, data: dict[str, Any]
) -> None:
    seq = len(items)
    _, raw = make_entry(
        region="r1", seq=seq, prev=digest(items[-1][1]), time=1000.0 + seq,
        kind=kind, data=data, key=key,
    )  # fmt: skip
    items.append((entry_key("r1", seq), raw))


def rotated_log() -> tuple[list[tuple[str, bytes]], Ed25519PrivateKey, Ed25519PrivateKey]:
    """Entries 0-2 signed by the first key, 3 the change to a second key, 4-5 by it."""
    items, old = small_log()
    new = Ed25519PrivateKey.generate()
    extend(items, old, KEY_CHANGE, key_change_data(old.public_key(), new.public_key(), "test"))
    for _ in range(2):
        extend(items, new, "drill.restore", {"ok": True})
    return items, old, new


def test_a_key_change_signed_by_the_current_key_verifies() -> None:
    items, old, new = rotated_log()
    for public in (None, old.public_key()):  # from the genesis entry, or pinned by an auditor
        report = check_chain("r1", items, public=public)
        assert report.ok, report.problems
        assert report.signer.key_id == key_id(new.public_key()) and report.signer.since == 3
    assert follow(items).key_id == key_id(new.public_key())
    assert follow(items[:3]).key_id == key_id(old.public_key())
    resumed = follow(items[4:], follow(items[:4]))
    assert (resumed.key_id, resumed.since, resumed.seq) == (key_id(new.public_key()), 3, 5)
    # the new key does not verify the history: only the key the chain starts with is pinned
    assert not check_chain("r1", items, public=new.public_key()).ok


def test_an_entry_signed_by_a_key_never_introduced_is_a_problem() -> None:
    items, old, new = rotated_log()
    stranger = Ed25519PrivateKey.generate()
    extend(items, stranger, "drill.restore", {"ok": True})
    report = check_chain("r1", items)
    assert [p["where"] for p in report.problems] == [entry_key("r1", 6)]
    what = report.problems[0]["what"]
    assert key_id(stranger.public_key()) in what and key_id(new.public_key()) in what
    assert KEY_CHANGE in what
    assert report.signer.key_id == key_id(new.public_key())  # a stray entry changes nothing
    # nor may the old key sign again once it has handed over
    items, old, new = rotated_log()
    extend(items, old, "drill.restore", {"ok": True})
    assert [p["where"] for p in check_chain("r1", items).problems] == [entry_key("r1", 6)]


def test_a_key_change_signed_by_the_wrong_key_is_a_problem() -> None:
    items, old = small_log()
    new = Ed25519PrivateKey.generate()
    # the new key announces itself: not a change the chain's key made
    extend(items, new, KEY_CHANGE, key_change_data(old.public_key(), new.public_key()))
    extend(items, new, "drill.restore", {"ok": True})
    report = check_chain("r1", items)
    assert [p["where"] for p in report.problems] == [entry_key("r1", 3), entry_key("r1", 4)]
    assert report.signer.key_id == key_id(old.public_key())
    assert follow(items).key_id == key_id(old.public_key())
    # a change signed by the right key must name a usable key (key_id included)
    items, old = small_log()
    data = key_change_data(old.public_key(), new.public_key()) | {"key_id": "ed25519:00"}
    extend(items, old, KEY_CHANGE, data)
    report = check_chain("r1", items)
    assert "does not name a valid" in report.problems[0]["what"]
    assert report.signer.key_id == key_id(old.public_key())


def test_a_genesis_naming_no_key_still_verifies_against_a_pinned_key() -> None:
    key = Ed25519PrivateKey.generate()
    _, raw = make_entry(
        region="r1", seq=0, prev="0" * 64, time=1000.0, kind="evidence.genesis", data={}, key=key
    )
    items = [(entry_key("r1", 0), raw)]
    extend(items, key, "drill.restore", {"ok": True})
    assert check_chain("r1", items, public=key.public_key()).ok
    assert not check_chain("r1", items).ok  # as before: nothing to check it with
    assert follow(items).key_id == key_id(key.public_key())  # a writer may continue it


def region_config(cfg_b: AgentConfig, region: str, data_dir: Path) -> AgentConfig:
    """An agent of ``region`` with its own data directory, hence its own signing key."""
    return cfg_b.model_copy(
        update={"region": region, "data_dir": data_dir, "report_signing_key": None}
    )


@pytest.mark.lab
async def test_an_agent_with_another_key_refuses_to_append(
    cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    """A new host that created its own signing key must not damage the chain."""
    first = await EvidenceLog.open(region_config(cfg_b, unique, tmp_path / "node-1"))
    second = await EvidenceLog.open(region_config(cfg_b, unique, tmp_path / "node-2"))
    try:
        await first.append("verification", {"ok": True})
        before = await first.raw_entries()
        with pytest.raises(SigningKeyError) as refused:
            await second.append("verification", {"ok": True, "node": 2})
        message = str(refused.value)
        assert key_id(first._key.public_key()) in message  # type: ignore[union-attr]
        assert key_id(second._key.public_key()) in message  # type: ignore[union-attr]
        assert "rotate-signing-key" in message and "nothing was written" in message
        with pytest.raises(SigningKeyError):
            await second.check_signer()
        await first.check_signer()
        assert await first.raw_entries() == before
        report = await second.verify()
        assert report.ok, report.problems
        await first.append("verification", {"ok": True, "n": 2})  # the right key goes on
        assert (await first.verify()).ok
    finally:
        await first.aclose()
        await second.aclose()


@pytest.mark.lab
async def test_rotate_signing_key_then_the_new_key_appends(
    cfg_b: AgentConfig, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent import cli_dr
    from agent.cli import main

    cfg = region_config(cfg_b, unique, tmp_path / "node-1")
    running = await EvidenceLog.open(cfg)  # the daemon, holding the old key
    try:
        await running.append("verification", {"ok": True})
        old = read_private_key(cfg.signing_key_path)
        assert old is not None
        new = Ed25519PrivateKey.generate()
        new_file = tmp_path / "new.key"
        install_private_key(new_file, new)
        monkeypatch.setattr(cli_dr, "load_config", lambda _: cfg)
        args = ["evidence", "rotate-signing-key", "--config", "agent.toml"]
        argv = [*args, "--new-key", str(new_file), "--reason", "host replaced"]
        assert await asyncio.to_thread(main, argv) == 0  # the command runs its own loop

        assert same_key(read_private_key(cfg.signing_key_path), new)
        assert cfg.signing_key_path.stat().st_mode & 0o777 == 0o600
        pub = cfg.signing_key_path.with_name(cfg.signing_key_path.name + ".pub")
        assert key_id(load_public_key(pub)) == key_id(new.public_key())
        change = (await running.entries())[-1]
        assert change["type"] == KEY_CHANGE and change["data"]["reason"] == "host replaced"
        assert change["signature"]["key_id"] == key_id(old.public_key())
        assert change["data"]["key_id"] == key_id(new.public_key())

        # a fresh agent with the installed key appends; the running one re-reads its file
        fresh = await EvidenceLog.open(cfg)
        try:
            await fresh.append("verification", {"ok": True, "by": "fresh"})
        finally:
            await fresh.aclose()
        entry = await running.append("verification", {"ok": True, "by": "running"})
        assert entry["signature"]["key_id"] == key_id(new.public_key())
        for pinned in (None, old.public_key()):
            report = await running.verify(pinned)
            assert report.ok, report.problems
            assert [e["type"] for e in report.entries][-3:] == [
                KEY_CHANGE, "verification", "verification",
            ]  # fmt: skip
        # an agent still holding the old key now refuses
        stale = region_config(cfg_b, unique, tmp_path / "node-2")
        install_private_key(stale.signing_key_path, old)
        stale_log = await EvidenceLog.open(stale)
        try:
            with pytest.raises(SigningKeyError, match=key_id(new.public_key())):
                await stale_log.append("verification", {"ok": True})
        finally:
            await stale_log.aclose()
        # running it again changes nothing
        assert await asyncio.to_thread(main, [*args, "--new-key", str(new_file)]) == 0
        assert [e["type"] for e in await running.entries()].count(KEY_CHANGE) == 1
    finally:
        await running.aclose()


@pytest.mark.lab
async def test_rotation_interrupted_before_installing_the_key_finishes_when_run_again(
    cfg_b: AgentConfig, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.evidence import rotate

    cfg = region_config(cfg_b, unique, tmp_path / "node-1")
    log = await EvidenceLog.open(cfg)
    try:
        await log.append("verification", {"ok": True})
        old = read_private_key(cfg.signing_key_path)
        new = Ed25519PrivateKey.generate()

        def crash(path: Path, key: Ed25519PrivateKey) -> None:
            raise OSError("power lost")

        monkeypatch.setattr(rotate, "install_private_key", crash)
        with pytest.raises(OSError, match="power lost"):
            await rotate.rotate_signing_key(cfg, new)
        monkeypatch.undo()
        assert same_key(read_private_key(cfg.signing_key_path), old)  # not installed yet
        assert (await log.entries())[-1]["type"] == KEY_CHANGE
        with pytest.raises(SigningKeyError):  # the old key may not continue the chain
            await log.append("verification", {"ok": True, "n": 2})

        done = await rotate.rotate_signing_key(cfg, new)
        assert (done.appended, done.installed, done.entry_seq) == (False, True, 2)
        assert same_key(read_private_key(cfg.signing_key_path), new)
        await log.append("verification", {"ok": True, "n": 3})  # re-reads the installed key
        report = await log.verify()
        assert report.ok, report.problems
        assert [e["type"] for e in report.entries].count(KEY_CHANGE) == 1
    finally:
        await log.aclose()


@pytest.mark.lab
async def test_rotation_without_the_current_key_is_refused(
    cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    from agent.evidence.rotate import rotate_signing_key

    cfg = region_config(cfg_b, unique, tmp_path / "node-1")
    log = await EvidenceLog.open(cfg)
    try:
        await log.append("verification", {"ok": True})
        before = await log.raw_entries()
        cfg.signing_key_path.unlink()  # the key is lost
        new = Ed25519PrivateKey.generate()
        with pytest.raises(SigningKeyError, match="no key file") as refused:
            await rotate_signing_key(cfg, new)
        assert "cannot be continued" in str(refused.value)
        install_private_key(cfg.signing_key_path, new)  # or replaced by the new key already
        with pytest.raises(SigningKeyError, match="put the current key back"):
            await rotate_signing_key(cfg, new)
        assert await log.raw_entries() == before
        assert (await log.verify()).ok
    finally:
        await log.aclose()


@pytest.mark.lab
async def test_the_monitor_of_an_agent_with_another_key_reports_instead_of_writing(
    cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    from agent.compliance.monitor import ComplianceMonitor

    owner = region_config(cfg_b, unique, tmp_path / "node-1")
    log = await EvidenceLog.open(owner)
    other = region_config(cfg_b, unique, tmp_path / "node-2").model_copy(update={"peers": []})
    monitor = ComplianceMonitor(other, drill_after=1e9)
    try:
        await log.append("verification", {"ok": True})
        before = await log.raw_entries()
        assert await monitor.evaluate_once()  # evaluated, not raised
        status = monitor.status()
        assert status["evidence_chain_ok"] is True and status["controls"]
        refused = status["evidence_write_refused"]
        chain_key, own_key = (read_private_key(c.signing_key_path) for c in (owner, other))
        assert chain_key is not None and own_key is not None
        assert key_id(chain_key.public_key()) in refused
        assert key_id(own_key.public_key()) in refused
        monitor._rpo_max = {"db": 1.0}
        await monitor._step("rpo sample", monitor.flush_rpo(2e9))  # logged, not raised
        assert await log.raw_entries() == before

        # the chain's key installed: the monitor records again, the status changes included
        install_private_key(other.signing_key_path, chain_key)
        await monitor.evaluate_once()
        assert monitor.status()["evidence_write_refused"] is None
        report = await log.verify()
        assert report.ok, report.problems
        assert "compliance.change" in [e["type"] for e in report.entries]
    finally:
        await monitor.aclose()
        await log.aclose()
