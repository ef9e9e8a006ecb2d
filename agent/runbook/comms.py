"""The communication plan and its message templates (pure).

Cadence: the first status within 5 minutes of declaring the incident,
updates at least every 20 minutes while degraded, and a closing note that
states the data lost (the measured RPO) and the time to recover (RTO).
Templates use ``{{field}}`` placeholders that the sender fills in.
"""

from __future__ import annotations

from agent.config import AgentConfig

FIRST_STATUS_MINUTES = 5
UPDATE_EVERY_MINUTES = 20

ROLES = (
    ("Incident commander", "owns decisions and the timeline; declares failover or not"),
    ("DR operator ({region})", "runs the runbook commands on the region being activated"),
    ("Communications lead", "sends every status on the cadence below; keeps the stakeholder list"),
    ("Scribe", "keeps the timeline (UTC) for the post-incident review and the evidence log"),
)

ESCALATION = (
    "0 min: on-call engineer (paged by the alert) acknowledges and assesses",
    "5 min: no clear recovery path: page the incident commander and the DR operator",
    "15 min, or the RTO is at risk: escalate to the engineering lead; consider failover",
    "30 min: notify the executive sponsor and, where contracts or regulation require it "
    "(DORA art. 19 major incidents, HIPAA), the compliance officer",
)


def _templates(cfg: AgentConfig) -> list[str]:
    regions = ", ".join([cfg.region, *(p.name for p in cfg.peers)])
    rpo = ", ".join(f"{s.name} {cfg.policy.rpo_target(s.name):g}s" for s in cfg.streams) or "-"
    return [
        "### Template: first status (within 5 minutes)",
        "",
        "```text",
        "[{{severity}}] {{service}} degraded — investigating",
        "Since {{start_utc}} UTC, {{what_users_see}}.",
        "Serving region: {{serving_region}} (of " + regions + "). Standby ready: {{yes|no}}.",
        "We are {{action}}. Next update by {{next_update_utc}} UTC (within 20 minutes).",
        "Incident commander: {{ic_name}}. Bridge: {{bridge}}.",
        "```",
        "",
        "### Template: update (every 20 minutes while degraded)",
        "",
        "```text",
        "[{{severity}}] {{service}} — update {{n}} at {{now_utc}} UTC",
        "Status: {{investigating|failing over|recovering|monitoring}}.",
        "Since the last update: {{changes}}.",
        "Current measured RPO: {{rpo_now}} (targets: " + rpo + ").",
        "Next update by {{next_update_utc}} UTC.",
        "```",
        "",
        "### Template: closing note",
        "",
        "```text",
        "[Resolved] {{service}} — {{start_utc}} to {{end_utc}} UTC",
        "Cause: {{cause}}.",
        "Recovery: {{failover|switchover|restore}} to region {{region}}; "
        "time to recover {{rto_measured}} (target " + f"{cfg.policy.rto_seconds:g}s).",
        "Data lost: {{data_lost}} — changes committed after {{last_safe_utc}} UTC "
        "(measured RPO {{rpo_measured}}; from `dragent evidence ls --type failover`).",
        "Follow-up: post-incident review on {{review_date}}; actions tracked in {{tracker}}.",
        "```",
        "",
        "### Template: drill announcement",
        "",
        "```text",
        "[Drill] {{drill_type}} drill on {{date}} {{time_utc}} UTC, region(s) {{regions}}.",
        "Expected impact: {{none|brief read-only period}}. No action needed.",
        "```",
        "",
    ]


def plan(cfg: AgentConfig) -> str:
    regions = ", ".join([cfg.region, *(p.name for p in cfg.peers)])
    lines = [
        "## Communication plan",
        "",
        f"Regions: {regions}. Times are UTC. Keep the bridge small: the incident commander "
        "invites people as needed.",
        "",
        "### Roles",
        "",
    ]
    lines += [f"- **{role.format(region=cfg.region)}**: {duty}" for role, duty in ROLES]
    lines += ["", "### Escalation", ""]
    lines += [f"- {step}" for step in ESCALATION]
    lines += [
        "",
        "### Who is told what, and when",
        "",
        f"- Within {FIRST_STATUS_MINUTES} minutes of declaring the incident: first status to "
        "the status page, the internal incident channel and on-call stakeholders.",
        f"- At least every {UPDATE_EVERY_MINUTES} minutes while degraded: an update, even if "
        "nothing changed.",
        "- On failover or switchover: tell application owners which region serves, and that "
        "writes after the last replicated change may be missing.",
        "- On resolution: a closing note stating the data lost (measured RPO), the time to "
        "recover (measured RTO) and the follow-up.",
        "",
    ]
    return "\n".join(lines + _templates(cfg))
