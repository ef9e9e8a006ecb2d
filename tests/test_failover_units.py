"""Failover pieces without servers: configuration rules, records and webhook
bodies, probe URL redaction, the link cutter over real TCP."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agent.coordination.events import phases, summary, webhook_body
from agent.coordination.health import probe, redact
from agent.failover_config import FailoverConfig


def test_fence_after_must_fall_between_renewal_and_lease() -> None:
    FailoverConfig(lease_ttl=10, renew_interval=1, fence_after=6)
    for bad in ({"fence_after": 10}, {"fence_after": 12}, {"renew_interval": 7}):
        with pytest.raises(ValidationError, match="renew_interval < fence_after < lease_ttl"):
            FailoverConfig(**{"lease_ttl": 10, "renew_interval": 1, "fence_after": 6, **bad})


def test_the_lease_etcd_grants_is_never_shorter_than_configured() -> None:
    from agent.failover_config import lease_seconds

    assert [lease_seconds(t) for t in (0.2, 3.0, 6.4, 12.0)] == [1, 3, 7, 12]


def test_stop_fencing_needs_a_command() -> None:
    with pytest.raises(ValidationError, match="stop_command"):
        FailoverConfig(fencing="stop")
    FailoverConfig(fencing="stop", stop_command=["systemctl", "stop", "postgresql"])


def test_switch_tables_are_told_apart_by_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TSIG", "c2VjcmV0")
    cfg = FailoverConfig(
        switches=[
            {"provider": "exec", "argv": ["true"]},
            {
                "provider": "rfc2136",
                "server": "10.0.0.53",
                "zone": "example.com",
                "name": "db.example.com.",
                "records": {"a": "10.1.0.1", "b": "10.2.0.1"},
                "tsig_name": "k",
                "tsig_secret": "env:TSIG",
            },
        ]
    )
    assert [s.provider for s in cfg.switches] == ["exec", "rfc2136"]
    assert "c2VjcmV0" not in repr(cfg)
    with pytest.raises(ValidationError):
        FailoverConfig(switches=[{"provider": "carrier-pigeon"}])


def test_phases_are_the_gaps_between_marks() -> None:
    t = {
        "failure_seen": 100.0,
        "acquired": 103.0,
        "fenced": 103.1,
        "caught_up": 103.5,
        "promoted": 104.0,
        "dns_switched": 104.25,
        "serving": 104.3,
    }
    assert phases(t) == {
        "detection": 3.0,
        "fencing": 0.1,
        "catch_up": 0.4,
        "promotion": 0.5,
        "dns": 0.25,
        "serving": 0.05,
    }
    assert phases({"failure_seen": 1.0, "acquired": 2.0})["promotion"] == 0.0


def test_webhook_body_suits_slack_and_pagerduty() -> None:
    record = {
        "kind": "failover",
        "epoch": 7,
        "from": "a",
        "to": "b",
        "reason": "lease of a expired",
        "rto_seconds": 4.2,
        "rpo_seconds": 0.1,
    }
    body = webhook_body(record)
    assert body["text"] == summary(record) and "a -> b" in body["text"]
    assert body["event_action"] == "trigger" and body["dedup_key"] == "dragent-failover-7"
    payload = body["payload"]
    assert payload["severity"] == "critical" and payload["source"] == "dragent/b"
    assert payload["custom_details"] == record


def test_probe_targets_never_show_credentials() -> None:
    assert redact("postgresql://u:pw@db:5432/app") == "postgresql://db:5432/app"


async def test_probe_reports_failures_without_raising() -> None:
    check = await probe("tcp://127.0.0.1:1", within=1.0)
    assert not check.ok and check.error
