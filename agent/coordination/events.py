"""Failover records and notifications.

A record is a JSON object: ``kind`` (failover|switchover|page), ``epoch``,
``from``/``to`` regions, ``reason``, ``timeline`` (wall-clock time of each
phase: failure_seen, acquired, fenced, caught_up, promoted, dns_switched,
serving), ``phases`` (seconds spent in each), ``rto_seconds`` and
``rpo_seconds`` (from the WAL heartbeats: the primary's last heartbeat seen
minus the last one replayed here) and ``errors``.

The coordinator writes it to etcd (``failovers/<epoch>``, and
``last_failover`` for the lockout), to ``<data_dir>/failovers/``, appends it
to the region's hash-chained evidence log in its vault (``to_evidence``, kind
``failover.<kind>``), then POSTs it to every webhook. The body is accepted
by Slack incoming webhooks (``text``) and carries PagerDuty Events v2
fields (``event_action``, ``payload`` with ``summary``/``source``/
``severity``/``custom_details``). Notification failures are logged, never
raised: they must not stop a failover.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from replicators import logs
from replicators.settings import Secret

PHASES = ("detection", "fencing", "catch_up", "promotion", "dns", "serving")
_MARKS = ("failure_seen", "acquired", "fenced", "caught_up", "promoted", "dns_switched", "serving")


def phases(timeline: dict[str, float]) -> dict[str, float]:
    """Seconds per phase between consecutive marks (a missing mark counts as zero)."""
    out: dict[str, float] = {}
    previous = timeline.get(_MARKS[0])
    for phase, mark in zip(PHASES, _MARKS[1:], strict=True):
        at = timeline.get(mark, previous)
        out[phase] = round(max(0.0, (at or 0.0) - (previous or 0.0)), 3)
        previous = at
    return out


def summary(record: dict[str, Any]) -> str:
    if record["kind"] == "page":
        return f"dragent {record['region']}: human needed: {record['reason']}"
    rto = record.get("rto_seconds")
    rpo = record.get("rpo_seconds")
    return (
        f"dragent {record['kind']} {record['from']} -> {record['to']} (epoch {record['epoch']}): "
        f"RTO {rto}s, RPO {rpo}s; {record['reason']}"
    )


def webhook_body(record: dict[str, Any]) -> dict[str, Any]:
    """A JSON body Slack and PagerDuty-style receivers accept."""
    text = summary(record)
    severity = "critical" if record["kind"] in ("failover", "page") else "info"
    return {
        "text": text,
        "event_action": "trigger",
        "dedup_key": f"dragent-{record['kind']}-{record.get('epoch', 0)}",
        "payload": {
            "summary": text[:1024],
            "source": f"dragent/{record.get('to') or record.get('region')}",
            "severity": severity,
            "custom_details": record,
        },
    }


async def notify(urls: Sequence[Secret], record: dict[str, Any], within: float = 5.0) -> int:
    """POST the record to every URL; return how many accepted. Never raises."""
    log = logs.get("failover")
    body = webhook_body(record)
    ok = 0
    async with aiohttp.ClientSession() as session:
        for url in urls:
            try:
                async with (
                    asyncio.timeout(within),
                    session.post(url.reveal(), json=body) as response,
                ):
                    ok += response.status < 300
                    if response.status >= 300:
                        log.warning("notification refused", status=response.status)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.warning("notification failed", error=type(exc).__name__)
    return ok


async def to_evidence(cfg: Any, record: dict[str, Any], within: float = 15.0) -> bool:
    """Append the record to ``cfg.region``'s evidence log; False (logged) on failure."""
    from agent.evidence.log import EvidenceLog

    try:
        async with asyncio.timeout(within):
            log = await EvidenceLog.open(cfg)
            try:
                await log.append(f"failover.{record['kind']}", record)
            finally:
                await log.aclose()
    except Exception as exc:  # evidence is recorded best effort, after the failover
        logs.get("failover").warning("evidence not recorded", error=f"{type(exc).__name__}: {exc}")
        return False
    return True


def write_local(data_dir: Path, record: dict[str, Any]) -> Path:
    """Write the record under ``data_dir/failovers`` (atomic rename); return the path."""
    folder = data_dir / "failovers"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{record.get('epoch', 0):010d}-{record['kind']}.json"
    path = folder / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path
