"""The failover drill (game day): kill the active region of a lab, measure, fail back, record.

It runs the failover engine's own lab drill (``agent.lab.failover_drill``):
both regions' coordinators with a fast lease, a streaming standby for
region b, and a client writing to region a that logs every acknowledged
commit (the ground truth). Region a is killed whole (coordinator,
PostgreSQL, S3, etcd member); the drill waits until b serves, then restarts
region a's servers and leaves a writable primary again (the fail-back of
the lab). The measured RTO (kill until b accepts writes under the new
epoch), RPO (acknowledged commits missing in b, as time) and the lost rows
are appended to the evidence log as ``drill.failover`` with b's failover
record and its timeline.

Refused unless the configuration's ``[policy] drillable`` is true or the
operator passes ``--i-understand``; and refused outside a lab (the drill
needs the lab's controls to inject the fault), naming why.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.evidence import EvidenceLog
from replicators.errors import DragentError

KIND = "drill.failover"


class DrillRefused(DragentError):
    """The drill may not run against this configuration."""


def lab_root(config_path: Path) -> Path | None:
    """The lab a config file belongs to (``<root>/<region>/agent.toml``), if any."""
    root = config_path.resolve().parent.parent
    return root if (root / "lab.json").exists() else None


def check_allowed(cfg: AgentConfig, config_path: Path, i_understand: bool) -> Path:
    """Return the lab root, or raise ``DrillRefused`` saying why not."""
    if not (cfg.policy.drillable or i_understand):
        raise DrillRefused(
            f"{config_path}: a failover drill kills region a; this configuration is not "
            "marked drillable",
            hint="set [policy] drillable = true on lab or staging configs, or pass --i-understand",
        )
    root = lab_root(config_path)
    if root is None:
        raise DrillRefused(
            f"{config_path}: not a lab configuration (no lab.json two levels up)",
            hint="the failover drill injects faults through the lab; run it against `dragent lab`",
        )
    return root


async def failover_drill(
    cfg: AgentConfig, root: Path, log: EvidenceLog, *, within: float = 60.0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one kill-the-active-region drill on the lab at ``root``; return (data, entry)."""
    from agent.lab import Lab
    from agent.lab.failover_drill import Drill, kill_trial

    started = time.time()
    name = time.strftime("fd-%H%M%S", time.gmtime(started))
    workdir = cfg.data_dir / "drills" / name
    workdir.mkdir(parents=True, exist_ok=True)
    async with Drill(Lab(root), name, workdir) as drill:
        await drill.ready()
        trial = await kill_trial(drill, within)
    record = trial.get("record", {})
    data = {
        "ok": True,
        "fault": "kill region a: coordinator, PostgreSQL, S3, etcd member",
        "started_at": started,
        "finished_at": time.time(),
        "rto_seconds": trial["rto_client"],
        "rto_from_kill": trial["rto_from_kill"],
        "rto_target": cfg.policy.rto_seconds,
        "rpo_seconds": trial["rpo_client"],
        "lost_rows": trial["lost_rows"],
        "committed_rows": trial["committed_rows"],
        "timeline": record.get("timeline", {}),
        "epoch": record.get("epoch"),
        "failed_back": True,
        "summary": (
            f"region b served {trial['rto_client']:.1f}s after region a was killed; "
            f"{trial['lost_rows']} of {trial['committed_rows']} acknowledged rows lost "
            f"(RPO {trial['rpo_client']:.2f}s)"
        ),
    }
    entry = await log.append(KIND, data)
    return data, entry
