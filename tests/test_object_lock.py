"""An immutable vault: with ``object_lock`` on a vault's S3 table every object the vault
writes carries an Object Lock retention; the store refuses to delete a locked version.

Lab tests ship segments through the normal shipper into a SeaweedFS bucket created with
Object Lock; the others check the configuration, its warnings and the compliance control.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
import tomli_w
from botocore.exceptions import ClientError
from prometheus_client import CollectorRegistry

from agent.compliance import controls as c
from agent.config import AgentConfig, ConfigError, StreamConfig, SyntheticOptions, parse_config
from agent.doctor import _object_lock, lock_warnings
from agent.lab.stream_rig import lab_shipper
from agent.policy_config import PolicyConfig
from replicators.errors import AccessDenied, NotFound
from replicators.keys import build_key_provider, unseal
from replicators.metrics import Metrics
from replicators.s3 import S3Store, s3_client
from replicators.settings import ObjectLockConfig, S3Config
from replicators.synthetic import SyntheticSource
from replicators.vault import Vault
from tests.test_pipeline import ship_for

DAY = 86400.0


# -- configuration --------------------------------------------------------------------------


def _config(lock: object, window: str | float = "7d") -> dict[str, object]:
    vault: dict[str, object] = {"endpoint": "http://127.0.0.1:1", "bucket": "v"}
    if lock is not None:
        vault["object_lock"] = lock
    return {
        "region": "b",
        "data_dir": "/tmp/x",
        "vault": vault,
        "keys": {"provider": "local", "key_file": "/tmp/k"},
        "retention": {"window": window},
    }


def test_object_lock_is_validated_and_errors_name_the_key() -> None:
    cfg = parse_config(_config({"mode": "GOVERNANCE", "retain": "8d"}))
    assert cfg.vault.object_lock == ObjectLockConfig(mode="GOVERNANCE", retain=8 * DAY)
    assert parse_config(_config(None)).vault.object_lock is None
    for bad, where in (
        ({"mode": "STRICT", "retain": "8d"}, "vault.object_lock.mode"),
        ({"mode": "COMPLIANCE", "retain": "0s"}, "vault.object_lock.retain"),
        ({"mode": "COMPLIANCE", "retain": "soon"}, "vault.object_lock.retain"),
        ({"mode": "COMPLIANCE"}, "vault.object_lock.retain"),
        ({"mode": "COMPLIANCE", "retain": "8d", "until": 3}, "vault.object_lock.until"),
    ):
        with pytest.raises(ConfigError) as err:
            parse_config(_config(bad))
        assert any(p.startswith(where) for p in err.value.problems), err.value.problems


def test_a_lock_shorter_than_the_recovery_window_is_warned_about(tmp_path: Path) -> None:
    assert lock_warnings(parse_config(_config({"mode": "GOVERNANCE", "retain": "8d"}))) == []
    short = parse_config(_config({"mode": "GOVERNANCE", "retain": "1d"}))
    (warning,) = lock_warnings(short)
    assert warning.startswith("vault.object_lock.retain: 1d is shorter than the recovery window")
    assert "(7d)" in warning
    assert lock_warnings(parse_config(_config({"mode": "COMPLIANCE", "retain": "9d"}, 0)))
    # ``dragent config check`` prints it and still passes
    import subprocess
    import sys

    path = tmp_path / "b.toml"
    path.write_text(tomli_w.dumps(_config({"mode": "GOVERNANCE", "retain": "1d"})))
    out = subprocess.run(
        [sys.executable, "-m", "agent", "config", "check", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "warning: vault.object_lock.retain: 1d is shorter" in out.stderr


def _facts(cfg: AgentConfig, bucket_locked: bool | None, require: bool = False) -> c.Facts:
    return c.Facts(
        now=0.0,
        policy=PolicyConfig(require_object_lock=require),
        streams=[],
        peers=[],
        entries=[],
        object_lock=bucket_locked,
        vault_locks=c.vault_lock_facts(cfg),
    )


def _control(facts: c.Facts) -> c.ControlResult:
    return next(r for r in c.evaluate(facts) if r.control == "vault-immutable")


def test_the_vault_immutable_control() -> None:
    locked = parse_config(_config({"mode": "COMPLIANCE", "retain": "8d"}))
    result = _control(_facts(locked, True))
    assert result.status == "pass", result.reason
    assert "b COMPLIANCE 8.0d" in result.reason
    assert _control(_facts(locked, None)).status == "unknown"
    no_bucket_lock = _control(_facts(locked, False))
    assert no_bucket_lock.status == "fail" and "the bucket has none" in no_bucket_lock.reason
    short = parse_config(_config({"mode": "GOVERNANCE", "retain": "1d"}))
    assert "less than the window 7.0d" in _control(_facts(short, True)).reason
    plain = parse_config(_config(None))
    assert _control(_facts(plain, False)).status == "pass"  # not required
    required = _control(_facts(plain, False, require=True))
    assert required.status == "fail" and "no object_lock configured" in required.reason
    ungathered = c.Facts(now=0.0, policy=PolicyConfig(), streams=[], peers=[], entries=[])
    assert _control(ungathered).status == "unknown"


# -- on the lab -----------------------------------------------------------------------------


async def _locked_bucket(base: S3Config, lock: ObjectLockConfig | None) -> S3Config:
    cfg = base.model_copy(
        update={"bucket": f"vlock-{time.time_ns() % 10**12}", "object_lock": lock, "prefix": ""}
    )
    async with s3_client(cfg) as s3:
        await s3.create_bucket(Bucket=cfg.bucket, ObjectLockEnabledForBucket=True)
    return cfg


@pytest.mark.lab
async def test_segments_shipped_to_a_locked_vault_cannot_be_deleted(
    cfg_a: AgentConfig, unique: str, tmp_path: Path
) -> None:
    peer = cfg_a.peers[0]
    lock = ObjectLockConfig(mode="GOVERNANCE", retain=DAY)
    cfg = await _locked_bucket(peer.vault, lock)
    store = await S3Store.open(cfg)
    keys = build_key_provider(peer.keys)
    try:
        vault = Vault(store)
        source = SyntheticSource(
            StreamConfig(
                name=unique, kind="synthetic", synthetic=SyntheticOptions(rate=500.0)
            ).synthetic
        )
        shipper = lab_shipper(
            unique, "synthetic", source, vault, keys, tmp_path / "shipped.json",
            Metrics(CollectorRegistry()), segment_max_bytes=1 << 20, max_age=0.05,
        )  # fmt: skip
        before = dt.datetime.now(dt.UTC)
        await ship_for(shipper, 0.6)
        refs = [r async for r in vault.segments(unique)]
        assert len(refs) >= 3
        # a blob beside the log (an artifacts pack's path) and a multipart upload too
        await vault.put_blob(f"artifacts/{unique}/packs/w1/000000000001.pack", b"p" * 100)
        big = store.cfg.model_copy(update={"multipart_threshold": 1 << 20})
        big_store = await S3Store.open(big)
        try:
            await big_store.put(f"backups/{unique}/x/pack-00000001.seg", b"b" * (6 << 20))
        finally:
            await big_store.aclose()
        written = [r.key for r in refs] + [
            f"artifacts/{unique}/packs/w1/000000000001.pack",
            f"backups/{unique}/x/pack-00000001.seg",
        ]
        async with s3_client(cfg) as s3:
            for key in written:
                got = await s3.get_object_retention(Bucket=cfg.bucket, Key=key)
                retention = got["Retention"]
                assert retention["Mode"] == "GOVERNANCE", key
                until = retention["RetainUntilDate"]
                assert before + dt.timedelta(hours=23) < until, (key, until)
                assert until < dt.datetime.now(dt.UTC) + dt.timedelta(days=1, minutes=1)

            key = refs[0].key
            head = await s3.head_object(Bucket=cfg.bucket, Key=key)
            version = head["VersionId"]
            # the vault's own credentials cannot delete a locked version...
            with pytest.raises(ClientError, match="AccessDenied"):
                await s3.delete_object(Bucket=cfg.bucket, Key=key, VersionId=version)
            with pytest.raises(AccessDenied):
                await store.purge(key)  # the real delete (every version): refused
            # ...and a plain DELETE only adds a delete marker: the version stays readable
            await store.delete(key)
            with pytest.raises(NotFound):
                await store.get(key)
            out = await s3.get_object(Bucket=cfg.bucket, Key=key, VersionId=version)
            async with out["Body"] as body:
                blob = await body.read()
            opened = await unseal(blob, keys, expect_stream=unique, expect_seq=refs[0].seq)
            assert opened.header.record_count > 0
    finally:
        await keys.aclose()
        await store.aclose()


@pytest.mark.lab
async def test_config_check_online_reports_the_bucket_lock(cfg_b: AgentConfig) -> None:
    lock = ObjectLockConfig(mode="COMPLIANCE", retain=8 * DAY)
    locked = await _locked_bucket(cfg_b.vault, lock)
    assert "Object Lock enabled; writes locked COMPLIANCE for 8d" in await _object_lock(locked)
    plain = cfg_b.vault.model_copy(update={"bucket": f"plain-{time.time_ns() % 10**12}"})
    async with s3_client(plain) as s3:
        await s3.create_bucket(Bucket=plain.bucket)
    with pytest.raises(ValueError, match="the bucket has no Object Lock"):
        await _object_lock(plain.model_copy(update={"object_lock": lock}))
