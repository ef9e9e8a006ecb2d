"""The runbook's sections (pure: configuration in, Markdown out)."""

from __future__ import annotations

from agent.config import AgentConfig, StreamConfig
from replicators.settings import S3Config


def _vault(v: S3Config) -> str:
    where = v.endpoint or f"AWS S3 ({v.region_name})"
    return f"`{where}` bucket `{v.bucket}`" + (f" prefix `{v.prefix}`" if v.prefix else "")


def _sh(*lines: str) -> str:
    return "```sh\n" + "\n".join(lines) + "\n```"


def _cmd(have: set[str], name: str, line: str, manual: str) -> str:
    if name in have:
        return _sh(line)
    return f"`{line}` is not available in this build: {manual}"


def _url(cfg: AgentConfig) -> str:
    scheme = "https" if cfg.http.tls_cert else "http"
    return f"{scheme}://{cfg.http.listen}"


def overview(cfg: AgentConfig) -> str:
    lines = [
        "## Regions and endpoints",
        "",
        "| region | role | agent | vault |",
        "| --- | --- | --- | --- |",
        f"| {cfg.region} (this one) | {cfg.role} | `{_url(cfg)}` | {_vault(cfg.vault)} |",
    ]
    for p in cfg.peers:
        lines.append(f"| {p.name} | peer | `{p.agent_url or '-'}` | {_vault(p.vault)} |")
    lines += ["", "| stream | kind | RPO target |", "| --- | --- | --- |"]
    for s in cfg.streams:
        lines.append(f"| {s.name} | {s.kind} | {cfg.policy.rpo_target(s.name):g}s |")
    lines += [
        "",
        f"RTO target: {cfg.policy.rto_seconds:g}s. Restore drills are due every "
        f"{cfg.policy.drill_every / 86400:g} days.",
    ]
    if cfg.etcd.endpoints:
        lines.append("Coordination (etcd): " + ", ".join(f"`{e}`" for e in cfg.etcd.endpoints))
    lines += [
        "",
        "Where things stand, from this region:",
        "",
        _sh(
            f"curl -s {_url(cfg)}/status",
            *(f"curl -s {p.agent_url}/status" for p in cfg.peers if p.agent_url),
        ),
        "",
    ]
    return "\n".join(lines)


def _restore_stream(s: StreamConfig, cfg: AgentConfig, path: str, have: set[str]) -> list[str]:
    out = [f"### Stream {s.name} ({s.kind})", "", "Check the vault holds an intact log:", ""]
    out += [_sh(f"dragent vault verify --config {path} --stream {s.name}"), ""]
    if s.kind == "postgres":
        target = cfg.data_dir / "restore" / s.name
        out += [
            "Build a new cluster at a point in time (`latest`, an ISO time, or an LSN); the "
            "directory must be absent or empty and reachable by the postgres OS user:",
            "",
            _cmd(
                have,
                "restore",
                f"dragent restore postgres --config {path} --stream {s.name} --to latest "
                f"--target-dir {target} --port 5434",
                "build the cluster from the newest base backup and the WAL in the vault",
            ),
        ]
    elif s.kind == "objects":
        out += [
            "Replay the bucket (or a prefix) to a time into a bucket of your choice:",
            "",
            f"`dragent restore objects --config {path} --stream {s.name} --to TIME "
            "--into BUCKET` (fill in TIME and BUCKET)",
        ]
    elif s.kind == "artifacts":
        out += [
            "Materialise a model version from the vault:",
            "",
            f"`dragent restore artifacts --config {path} --stream {s.name} --model MODEL "
            "--to DIR` (fill in MODEL and DIR)",
        ]
    else:
        out += ["Restore into a scratch copy and compare Merkle roots:", ""]
        out += [_sh(f"dragent drill restore --config {path} --stream {s.name}")]
    return [*out, ""]


def restore(cfg: AgentConfig, path: str, have: set[str]) -> str:
    lines = [
        "## Restore",
        "",
        f"Use when data must come back from region {cfg.region}'s vault (a bad change, a lost "
        "region, an audit). Nothing in the vault is used before it is verified.",
        "",
    ]
    for s in cfg.streams:
        lines += _restore_stream(s, cfg, path, have)
    lines += [
        "Record the evidence and check the log is intact:",
        "",
        _sh(f"dragent evidence verify --config {path}", f"dragent evidence ls --config {path}"),
        "",
    ]
    return "\n".join(lines)


def failover(cfg: AgentConfig, path: str, have: set[str]) -> str:
    peers = ", ".join(p.name for p in cfg.peers) or "(none configured)"
    auto = "on" if cfg.failover.automatic else "off"
    return "\n".join(
        [
            "## Failover",
            "",
            f"Use when the active region is lost. Automatic failover is **{auto}** here. "
            f"Run from the region being activated ({cfg.region}); other regions: {peers}.",
            "",
            "1. Open the incident (see Communication plan); first status within 5 minutes.",
            "2. Confirm the active region is really down, from two places:",
            "",
            _sh(*(f"curl -s --max-time 5 {p.agent_url}/healthz" for p in cfg.peers if p.agent_url))
            if any(p.agent_url for p in cfg.peers)
            else "(no peer agent URL configured)",
            "",
            "3. Take over (fences the old side through the lease, catches up from the vault, "
            "promotes, switches DNS, records the measured RTO and RPO):",
            "",
            _cmd(have, "failover", f"dragent failover --to {cfg.region} --config {path}",
                 "bump the epoch, promote the standby, switch DNS by hand, then record it"),
            "",
            "4. Check every stream is served from this region and note the data lost:",
            "",
            _sh(
                f"curl -s {_url(cfg)}/status",
                f"dragent evidence ls --config {path} --type failover",
            ),
            "",
        ]
    )  # fmt: skip


def switchover(cfg: AgentConfig, path: str, have: set[str]) -> str:
    peers = ", ".join(p.name for p in cfg.peers) or "another region"
    return "\n".join(
        [
            "## Switchover",
            "",
            f"Planned move of the active role to this region ({cfg.region}); loses nothing "
            f"(the old side drains first). To move it to {peers}, run the same command from "
            "that region's runbook.",
            "",
            _cmd(have, "switchover", f"dragent switchover --to {cfg.region} --config {path}",
                 "stop writes, wait for RPO 0, then fail over"),
            "",
        ]
    )  # fmt: skip


def failback(cfg: AgentConfig, path: str, have: set[str]) -> str:
    return "\n".join(
        [
            "## Failback",
            "",
            "Return to the original region once it is healthy: it is re-seeded (pg_rewind or a "
            "fresh base backup), catches up, then a switchover moves the traffic back.",
            "",
            _cmd(have, "failback", f"dragent failback --config {path}",
                 "re-seed the old region, then run a switchover back"),
            "",
            "Afterwards run a restore drill and record it:",
            "",
            _sh(f"dragent drill restore --config {path}"),
            "",
        ]
    )  # fmt: skip
