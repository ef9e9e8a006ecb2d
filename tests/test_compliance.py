"""Compliance controls (pure) and the monitor against a real vault and key files."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.compliance import controls as c
from agent.compliance.keyage import created_at
from agent.compliance.monitor import ComplianceMonitor
from agent.config import AgentConfig, parse_config
from agent.policy_config import DAY, PolicyConfig
from replicators.keys import generate_key_file, rotate_key_file

POLICY = PolicyConfig(
    drill_every=7 * DAY, default_rpo_seconds=5.0, max_key_age=90 * DAY, rpo_window=DAY
)
REQUIRED = {
    "SOC2 A1.2", "SOC2 A1.3", "SOC2 CC7.5", "ISO A.5.29", "ISO A.5.30", "ISO A.8.13",
    "ISO A.8.14", "NIST CP-2", "NIST CP-4", "NIST CP-6", "NIST CP-7", "NIST CP-9",
    "NIST CP-10", "DORA 11", "DORA 12",
}  # fmt: skip


def entry(kind: str, at: float, seq: int = 1, **data: Any) -> dict[str, Any]:
    return {"region": "b", "seq": seq, "type": kind, "time": at, "data": data}


def facts(now: float, entries: list[dict[str, Any]], **kw: Any) -> c.Facts:
    base: dict[str, Any] = {
        "now": now, "policy": POLICY, "streams": ["db"], "peers": ["a"], "entries": entries,
        "key_created": {"b": now - DAY}, "encrypted": {"a": True}, "chain_ok": True,
    }  # fmt: skip
    return c.Facts(**(base | kw))


def status(f: c.Facts, control: str) -> str:
    return next(r for r in c.evaluate(f) if r.control == control).status


def test_every_required_clause_is_served() -> None:
    served = {clause for ctl in c.CONTROLS for clause in ctl.clauses}
    assert served >= REQUIRED
    assert any(clause.startswith("HIPAA 164.308(a)(7)") for clause in served)


def test_drill_overdue_fails_and_passes_after_a_new_drill() -> None:
    drills = [entry(c.DRILL_RESTORE, 0.0, ok=True, rto_seconds=3.0)]
    assert status(facts(1 * DAY, drills), "restore-drill-current") == "pass"
    overdue = facts(8 * DAY, drills)
    result = next(r for r in c.evaluate(overdue) if r.control == "restore-drill-current")
    assert result.status == "fail" and result.evidence[0]["time"] == 0.0
    drills.append(entry(c.DRILL_RESTORE, 8 * DAY, seq=2, ok=True, rto_seconds=2.0))
    assert status(facts(8 * DAY + 60, drills), "restore-drill-current") == "pass"
    # a failed drill does not count as the drill being done
    failed = [entry(c.DRILL_RESTORE, 8 * DAY, ok=False, rto_seconds=None)]
    assert status(facts(8 * DAY + 60, failed), "restore-drill-current") == "fail"
    assert status(facts(8 * DAY + 60, failed), "restore-within-rto") == "fail"


def test_rpo_above_target_in_the_period_fails_until_it_leaves_the_window() -> None:
    def sample(at: float, rpo: float) -> dict[str, Any]:
        return entry(c.RPO_SAMPLE, at, streams={"db": {"max_rpo": rpo, "target": 5.0}})

    now = 10 * DAY
    good = [sample(now - 3600 * h, 0.4) for h in range(1, 6)]
    assert status(facts(now, good), "rpo-within-target") == "pass"
    breach = [*good, sample(now - 2 * 3600 - 30, 9.5)]
    result = next(r for r in c.evaluate(facts(now, breach)) if r.control == "rpo-within-target")
    assert result.status == "fail" and "db 9.5s" in result.reason
    assert [e["time"] for e in result.evidence] == [now - 2 * 3600 - 30]
    # a day later the breach is out of the window and newer samples are within target
    later = now + DAY
    fresh = [*breach, *(sample(later - 3600 * h, 0.3) for h in range(1, 4))]
    assert status(facts(later, fresh), "rpo-within-target") == "pass"
    # the live RPO counts too
    assert status(facts(later, fresh, live_rpo={"db": 7.0}), "rpo-within-target") == "fail"
    assert status(facts(later, []), "rpo-within-target") == "unknown"


def test_recovery_window_shorter_than_the_policy_fails_once_the_history_is_longer() -> None:
    week = 7 * DAY
    assert status(facts(DAY, []), "recovery-window") == "unknown"

    def window(now: float, oldest: float | None, first_seen: float) -> str:
        last = {"stream": "db", "window": week, "oldest_point": oldest, "first_seen": first_seen}
        return status(facts(now, [], recovery_windows={"db": last}), "recovery-window")

    assert window(3 * DAY, 0.5 * DAY, 0.0) == "pass"  # a young vault holds all of its history
    assert window(30 * DAY, 22 * DAY, 0.0) == "pass"  # 8 days back, policy 7
    assert window(30 * DAY, 25 * DAY, 0.0) == "fail"  # a month old, 5 days back
    # nothing restorable at all, in a vault older than the window
    assert window(30 * DAY, None, 0.0) == "fail"


def test_key_older_than_allowed_fails_and_passes_after_rotation() -> None:
    now = 200 * DAY
    assert status(facts(now, [], key_created={"b": now - 100 * DAY}), "key-age") == "fail"
    assert status(facts(now, [], key_created={"b": now - 10 * DAY}), "key-age") == "pass"
    assert status(facts(now, [], key_created={"b": None}), "key-age") == "unknown"


def test_restore_slower_than_the_rto_fails() -> None:
    slow = [entry(c.DRILL_RESTORE, 0.0, ok=True, rto_seconds=POLICY.rto_seconds + 1)]
    assert status(facts(60, slow), "restore-within-rto") == "fail"


def test_key_ids_carry_their_creation_time() -> None:
    assert created_at("k-20261128-101500-0a1b2c3d") == pytest.approx(
        time.mktime(time.strptime("2026-11-28 10:15:00", "%Y-%m-%d %H:%M:%S")) - time.timezone
    )
    assert created_at("arn:aws:kms:us-east-1:1:key/x") is None


def lab_free_config(tmp_path: Path) -> AgentConfig:
    key = tmp_path / "kek.key"
    return parse_config(
        {
            "region": "b",
            "data_dir": str(tmp_path),
            "vault": {"endpoint": "http://127.0.0.1:1", "bucket": "v"},
            "keys": {"provider": "local", "key_file": str(key)},
            "streams": [{"name": "db", "kind": "synthetic"}],
        }
    )


def test_collector_exports_every_control_with_its_status(tmp_path: Path) -> None:
    monitor = ComplianceMonitor(lab_free_config(tmp_path))
    monitor.results = c.evaluate(facts(8 * DAY, []))
    monitor.evaluated_at = 8 * DAY
    registry = CollectorRegistry()
    registry.register(monitor.collector)
    text = generate_latest(registry).decode()
    assert 'dragent_compliance_control{control="restore-drill-current",status="fail"} 1.0' in text
    assert 'dragent_compliance_control{control="alternate-site",status="pass"} 1.0' in text
    assert 'dragent_drill_interval_seconds{drill="restore"} 604800.0' in text
    assert monitor.status()["counts"]["fail"] >= 1


def write_old_key_file(path: Path, key_id: str) -> None:
    doc = {"format": "dragent-kek/1", "current": key_id, "keys": {key_id: secrets.token_hex(32)}}
    path.write_text(json.dumps(doc))
    path.chmod(0o600)


@pytest.mark.lab
async def test_monitor_key_age_and_drill_against_the_vault(
    cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    from tests.test_drills import drill_config, publish

    cfg = drill_config(cfg_b, unique, tmp_path)
    key_file = tmp_path / "kek.key"
    write_old_key_file(key_file, "k-20250101-000000-0badc0de")
    policy = PolicyConfig(max_key_age=30 * DAY, drill_every=DAY, drill_schedule=False)
    cfg = cfg.model_copy(update={"keys": cfg.keys.model_copy(update={"key_file": key_file})})
    cfg = cfg.model_copy(update={"policy": policy, "peers": []})
    await publish(cfg, unique, segments=2, per=10)

    from agent.verifyjobs import Job

    job = Job("j1", unique, "synthetic", False, time.time(), state="done",
              report={"kind": "synthetic", "stream": unique, "ok": True, "summary": "equal",
                      "signature": {"value": "c2ln"}})  # fmt: skip
    monitor = ComplianceMonitor(cfg, drill_after=0.0, verifications=lambda: [job])
    try:
        results = {r.control: r for r in await monitor.evaluate_once()}
        assert results["key-age"].status == "fail"
        assert results["restore-drill-current"].status == "fail"
        assert results["evidence-intact"].status == "pass"

        # the failover engine's record of a failover becomes evidence, once
        from agent.coordination.events import write_local

        record = {"kind": "failover", "epoch": 7, "from": "a", "to": "b", "reason": "test",
                  "timeline": {}, "rto_seconds": 4.2, "rpo_seconds": 0.1, "errors": []}  # fmt: skip
        write_local(cfg.data_dir, record)
        # and so does a gap a re-seeded slot left in a stream's log, once
        from replicators.postgres import gaps

        gap = gaps.Gap(unique, "a", "dragent_a", 1 << 24, 3 << 24, 2, 100.0, 200.0, "dropped")
        gaps.record(cfg.data_dir / gaps.DIRECTORY, gap)
        rotate_key_file(key_file)
        cfg = cfg.model_copy(update={"role": "passive", "policy": policy.model_copy(
            update={"drill_schedule": True})})  # fmt: skip
        monitor.update_config(cfg)
        results = {r.control: r for r in await monitor.evaluate_once()}
        assert results["key-age"].status == "pass"
        assert results["restore-drill-current"].status == "pass"  # the monitor drilled
        assert results["restore-within-rto"].status == "pass"
        assert results["failover-tested"].status == "pass"
        chain = await (await monitor.evidence()).verify()
        assert chain.ok, chain.problems
        kinds = [e["type"] for e in chain.entries]
        assert kinds.count(c.KEY_ROTATION) == 2 and c.DRILL_RESTORE in kinds
        await monitor.evaluate_once()
        kinds = [e["type"] for e in await (await monitor.evidence()).entries()]
        assert kinds.count(c.FAILOVER) == 1 and kinds.count(c.VERIFICATION) == 1
        assert kinds.count(c.STREAM_GAP) == 1
        [entry] = [
            e for e in await (await monitor.evidence()).entries() if e["type"] == c.STREAM_GAP
        ]
        assert entry["data"]["start"] == "0/1000000" and entry["data"]["recovery_window"] == "gap"
        # a key file replaced by one without the old versions is no rotation
        generate_key_file(key_file.with_suffix(".new"))
        key_file.with_suffix(".new").replace(key_file)
        results = {r.control: r for r in await monitor.evaluate_once()}
        assert results["key-age"].status == "fail"
        assert "replaced, not rotated" in results["key-age"].reason
        kinds = [e["type"] for e in await (await monitor.evidence()).entries()]
        assert kinds.count(c.KEY_ROTATION) == 2
        changes = [e for e in chain.entries if e["type"] == c.CONTROL_CHANGE]
        assert {"control": "key-age", "from": "fail", "to": "pass"}.items() <= {
            k: v
            for ch in changes[-1]["data"]["changes"]
            if ch["control"] == "key-age"
            for k, v in ch.items()
        }.items()
    finally:
        await monitor.aclose()
