"""The compliance report's content, built from evidence entries (pure).

``build_report`` takes the entries of every log read (this region's and its
peers'), the period and the control results, and returns the unsigned
report dict: the fields every report fills (``verifiers/report.py``) plus
``period``, ``rpo`` (per stream: target and the recorded samples),
``drills``, ``verifications``, ``events``, ``controls`` and ``evidence``
(per log: the head seq and hash at report time, so the report can be
checked against the log later).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.compliance import controls as c
from agent.policy_config import PolicyConfig

EVENTS = (c.FAILOVER, c.SWITCHOVER, c.DRILL_FAILOVER, c.KEY_ROTATION, c.CONTROL_CHANGE)


def in_period(entries: Sequence[Mapping[str, Any]], start: float, end: float) -> list[Any]:
    return sorted((e for e in entries if start <= float(e["time"]) <= end), key=_order)


def _order(e: Mapping[str, Any]) -> tuple[float, str, int]:
    return float(e["time"]), str(e.get("region")), int(e.get("seq", 0))


def rpo_series(entries: Sequence[Mapping[str, Any]], policy: PolicyConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for e in entries:
        if e["type"] != c.RPO_SAMPLE:
            continue
        for stream, s in e["data"].get("streams", {}).items():
            row = out.setdefault(stream, {"target": policy.rpo_target(stream), "points": []})
            row["points"].append([float(e["time"]), float(s["max_rpo"])])
    for row in out.values():
        values = [v for _, v in row["points"]]
        row["max"] = max(values)
        row["breaches"] = sum(v > row["target"] for v in values)
    return out


def _cite(e: Mapping[str, Any]) -> dict[str, Any]:
    return {"region": e.get("region"), "seq": e.get("seq"), "time": e["time"]}


def drills(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in entries:
        if e["type"] == c.DRILL_RESTORE:
            d = e["data"]
            out.append(
                _cite(e)
                | {
                    "ok": bool(d.get("ok")),
                    "equal": d.get("equal"),
                    "rto_seconds": d.get("rto_seconds"),
                    "rto_target": d.get("rto_target"),
                    "phases": d.get("phases", {}),
                    "summary": d.get("summary", ""),
                }
            )
    return out


def verifications(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in entries:
        if e["type"] == c.VERIFICATION:
            d = e["data"]
            row = {"stream": d.get("stream"), "ok": bool(d.get("ok")), "what": "verification"}
            out.append(_cite(e) | row | {"summary": d.get("summary", "")})
        elif e["type"] == c.DRILL_RESTORE:
            for s in e["data"].get("streams", []):
                row = {"stream": s.get("stream"), "ok": bool(s.get("ok")), "what": "restore drill"}
                roots = s.get("roots", {})
                text = f"Merkle roots {'equal' if s.get('equal') else 'differ'}: " + ", ".join(
                    f"{k} {v[:16]}" for k, v in roots.items()
                )
                out.append(_cite(e) | row | {"summary": text})
    return out


def events(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    chosen = [e for e in entries if e["type"] in EVENTS]
    return [_cite(e) | {"type": e["type"], "data": e["data"]} for e in chosen]


def build_report(
    *,
    region: str,
    entries: Sequence[Mapping[str, Any]],
    start: float,
    end: float,
    policy: PolicyConfig,
    controls: Sequence[c.ControlResult],
    heads: Mapping[str, Mapping[str, Any]],
    generated_at: float,
) -> dict[str, Any]:
    """The unsigned compliance report for ``[start, end]``."""
    period = in_period(entries, start, end)
    failing = [r for r in controls if r.status != "pass"]
    rpo = rpo_series(period, policy)
    drill_rows = drills(period)
    summary = (
        f"{len(controls) - len(failing)}/{len(controls)} controls pass; "
        f"{len(drill_rows)} restore drills, "
        f"{sum(r['breaches'] for r in rpo.values())} RPO samples above target in the period"
    )
    return {
        "kind": "compliance",
        "stream": ",".join(sorted(rpo)) or "-",
        "region": region,
        "started_at": start,
        "finished_at": end,
        "generated_at": generated_at,
        "at": {"from": start, "to": end},
        "period": {"from": start, "to": end},
        "ok": not failing,
        "summary": summary,
        "targets": {"rto_seconds": policy.rto_seconds, "drill_every": policy.drill_every},
        "rpo": rpo,
        "drills": drill_rows,
        "verifications": verifications(period),
        "events": events(period),
        "controls": [r.as_dict() for r in controls],
        "evidence": {k: dict(v) for k, v in heads.items()},
        "roots": {k: str(v.get("hash")) for k, v in heads.items()},
        "counts": {k: int(v.get("entries", 0)) for k, v in heads.items()},
        "differences": [
            {"what": f"{r.control}: {r.status}: {r.reason}", "where": r.control} for r in failing
        ],
    }
