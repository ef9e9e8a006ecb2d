"""DR drills: the non-disruptive restore drill (and its schedule); results become evidence."""

from __future__ import annotations

from typing import Any

from agent.config import AgentConfig
from agent.drills.restore import KIND as RESTORE
from agent.drills.restore import restore_drill
from agent.evidence import EvidenceLog
from verifiers.report import load_or_create_signing_key, sign

EVIDENCE_FIELDS = (
    "ok", "equal", "summary", "rto_seconds", "rto_target", "phases", "at", "started_at",
    "finished_at", "streams", "scratch_removed",
)  # fmt: skip


async def run_restore_drill(
    cfg: AgentConfig,
    log: EvidenceLog,
    *,
    at: float | None = None,
    streams: list[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a restore drill, sign its report, append it to the evidence log.

    Returns ``(signed report, evidence entry)``. The entry carries the
    report's signature, so the report can be matched to it later.
    """
    evidence = await log.entries() if at is not None else None
    report = await restore_drill(cfg, at=at, streams=streams, evidence=evidence)
    signed = sign(report, load_or_create_signing_key(cfg.signing_key_path))
    data = {k: report[k] for k in EVIDENCE_FIELDS if k in report}
    data["report_signature"] = signed["signature"]["value"]
    entry = await log.append(RESTORE, data)
    return signed, entry


__all__ = ["RESTORE", "restore_drill", "run_restore_drill"]
