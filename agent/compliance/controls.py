"""Compliance controls: pure evaluation of facts into pass / fail / unknown.

``evaluate(facts)`` is a function of its input alone (time is ``facts.now``),
so every control is tested without a server. Each result names the evidence
entries behind it (region, seq, type, time) and the clauses it serves:
SOC 2 (TSC 2017) A1.2, A1.3, CC7.5; ISO/IEC 27001:2022 Annex A 5.29, 5.30,
8.13, 8.14; NIST SP 800-53 rev. 5 CP-2, CP-4, CP-6, CP-7, CP-9, CP-10;
HIPAA 45 CFR 164.308(a)(7); DORA (EU 2022/2554) articles 11 and 12.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.policy_config import PolicyConfig

Status = Literal["pass", "fail", "unknown"]
STATUSES: tuple[Status, ...] = ("pass", "fail", "unknown")
YEAR = 365 * 86400.0

# Evidence entry types (docs/vault-layout.md, "Evidence log").
DRILL_RESTORE = "drill.restore"
DRILL_FAILOVER = "drill.failover"
VERIFICATION = "verification"
RPO_SAMPLE = "rpo.sample"
KEY_ROTATION = "key.rotation"
FAILOVER = "failover"
SWITCHOVER = "switchover"
CONTROL_CHANGE = "compliance.change"
STREAM_GAP = "stream.gap"
VAULT_GC = "vault.gc"
FAILOVER_KINDS = (DRILL_FAILOVER, FAILOVER, SWITCHOVER)


@dataclass(frozen=True)
class Facts:
    """Everything a control may look at, gathered by the monitor (or a test)."""

    now: float
    policy: PolicyConfig
    streams: Sequence[str]
    peers: Sequence[str]
    entries: Sequence[Mapping[str, Any]]  # evidence of every log read, any order
    live_rpo: Mapping[str, float] = field(default_factory=dict)  # stream -> seconds
    key_created: Mapping[str, float | None] = field(default_factory=dict)  # key name -> time
    key_problems: Mapping[str, str] = field(default_factory=dict)  # key name -> what is wrong
    encrypted: Mapping[str, bool] = field(default_factory=dict)  # destination -> has a KEK
    chain_ok: bool | None = None
    object_lock: bool | None = None
    recovery_windows: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """stream -> the collector's latest pass (``replicators.postgres.gc.latest``)."""
    vault_locks: Mapping[str, Mapping[str, Any]] | None = None
    """vault (region) -> its configured ``object_lock`` (``vault_lock_facts``); ``None``:
    not gathered. ``object_lock`` above is the online half: this region's vault bucket
    answered that Object Lock is enabled."""


@dataclass(frozen=True)
class ControlResult:
    control: str
    title: str
    status: Status
    reason: str
    clauses: tuple[str, ...]
    evidence: tuple[Mapping[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "control": self.control,
            "title": self.title,
            "status": self.status,
            "reason": self.reason,
            "clauses": list(self.clauses),
            "evidence": [dict(e) for e in self.evidence],
        }


def ref(entry: Mapping[str, Any]) -> dict[str, Any]:
    """How a result cites an evidence entry."""
    return {
        "region": entry.get("region"),
        "seq": entry.get("seq"),
        "type": entry.get("type"),
        "time": entry.get("time"),
    }


def of_type(entries: Iterable[Mapping[str, Any]], *kinds: str) -> list[Mapping[str, Any]]:
    """Entries of the given types, oldest first."""
    return sorted((e for e in entries if e.get("type") in kinds), key=lambda e: e["time"])


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _latest_ok(facts: Facts, kinds: tuple[str, ...]) -> Mapping[str, Any] | None:
    good = [e for e in of_type(facts.entries, *kinds) if e["data"].get("ok")]
    return good[-1] if good else None


Outcome = tuple[Status, str, tuple[Mapping[str, Any], ...]]


def _due(facts: Facts, kinds: tuple[str, ...], every: float, what: str) -> Outcome:
    last = _latest_ok(facts, kinds)
    if last is None:
        return "fail", f"no successful {what} on record (due every {_ago(every)})", ()
    age = facts.now - float(last["time"])
    status: Status = "fail" if age > every else "pass"
    return status, f"last successful {what} {_ago(age)} ago (due every {_ago(every)})", (ref(last),)


def objectives_defined(facts: Facts) -> Outcome:
    if not facts.streams:
        return "fail", "no streams configured: nothing is protected", ()
    targets = ", ".join(f"{s} RPO {facts.policy.rpo_target(s):g}s" for s in facts.streams)
    return "pass", f"RTO {facts.policy.rto_seconds:g}s; {targets}", ()


def drill_current(facts: Facts) -> Outcome:
    return _due(facts, (DRILL_RESTORE,), facts.policy.drill_every, "restore drill")


def restore_within_rto(facts: Facts) -> Outcome:
    drills = of_type(facts.entries, DRILL_RESTORE)
    if not drills:
        return "unknown", "no restore drill on record", ()
    last = drills[-1]
    rto, target = last["data"].get("rto_seconds"), facts.policy.rto_seconds
    if not last["data"].get("ok") or rto is None:
        return "fail", "the last restore drill failed", (ref(last),)
    if float(rto) > target:
        return "fail", f"last restore took {rto:.1f}s, above the {target:g}s RTO", (ref(last),)
    return "pass", f"last restore took {rto:.1f}s, within the {target:g}s RTO", (ref(last),)


def rpo_within_target(facts: Facts) -> Outcome:
    since = facts.now - facts.policy.rpo_window
    samples = [e for e in of_type(facts.entries, RPO_SAMPLE) if float(e["time"]) >= since]
    breaches: list[Mapping[str, Any]] = []
    worst: list[str] = []
    for e in samples:
        for stream, s in e["data"].get("streams", {}).items():
            if float(s["max_rpo"]) > facts.policy.rpo_target(stream):
                breaches.append(e)
                worst.append(f"{stream} {float(s['max_rpo']):.1f}s")
                break
    live = [
        f"{s} {v:.1f}s now" for s, v in facts.live_rpo.items() if v > facts.policy.rpo_target(s)
    ]
    if breaches or live:
        cited = tuple(ref(e) for e in breaches[-5:])
        return "fail", "RPO above target: " + ", ".join(worst[-3:] + live), cited
    if not samples and not facts.live_rpo:
        return "unknown", f"no RPO measured in the last {_ago(facts.policy.rpo_window)}", ()
    cited = tuple(ref(e) for e in samples[-1:])
    return "pass", f"{len(samples)} RPO samples in the window, all within target", cited


def backups_verified(facts: Facts) -> Outcome:
    every = facts.policy.max_verification_age
    return _due(facts, (VERIFICATION, DRILL_RESTORE), every, "verification")


def backups_encrypted(facts: Facts) -> Outcome:
    if not facts.policy.encryption_required:
        return "pass", "encryption not required by the policy", ()
    missing = sorted(d for d, ok in facts.encrypted.items() if not ok)
    if missing or not facts.encrypted:
        return "fail", "destinations without a key-encryption key: " + ", ".join(missing), ()
    names = ", ".join(sorted(facts.encrypted))
    return "pass", f"segments sealed with AES-256-GCM, data keys wrapped by {names}", ()


def key_age(facts: Facts) -> Outcome:
    if not facts.key_created:
        return "unknown", "no key-encryption key to check", ()
    limit, old, unknown = facts.policy.max_key_age, [], []
    for name, created in sorted(facts.key_created.items()):
        if created is None:
            unknown.append(name)
        elif facts.now - created > limit:
            old.append(f"{name} {_ago(facts.now - created)}")
    rotations = tuple(ref(e) for e in of_type(facts.entries, KEY_ROTATION)[-3:])
    if facts.key_problems:
        return "fail", "; ".join(facts.key_problems[k] for k in sorted(facts.key_problems)), ()
    if old:
        return "fail", f"keys older than {_ago(limit)}: " + ", ".join(old), rotations
    if unknown:
        return "unknown", "creation time unknown for: " + ", ".join(unknown), rotations
    return "pass", f"every key younger than {_ago(limit)}", rotations


def alternate_site(facts: Facts) -> Outcome:
    if not facts.peers:
        return "fail", "no other region: copies would share this region's fate", ()
    return "pass", "copies kept in region(s) " + ", ".join(facts.peers), ()


def evidence_intact(facts: Facts) -> Outcome:
    if facts.chain_ok is None:
        return "unknown", "the evidence log has not been checked yet", ()
    if not facts.chain_ok:
        return "fail", "the evidence log's hash chain is broken (see dragent evidence verify)", ()
    if facts.policy.require_object_lock and not facts.object_lock:
        return "fail", "the vault's bucket has no Object Lock, which the policy requires", ()
    locked = "under Object Lock" if facts.object_lock else "create-only, no Object Lock"
    return "pass", f"hash chain and signatures verified; entries {locked}", ()


def failover_tested(facts: Facts) -> Outcome:
    return _due(
        facts, FAILOVER_KINDS, max(YEAR, facts.policy.drill_every), "failover or switchover"
    )


def recovery_window(facts: Facts) -> Outcome:
    """Every point of each stream's retention window restorable from this region's vault:
    the oldest reachable point (as of the collector's latest pass) is at least the policy's
    window back, once the vault's history is that long (a younger vault holds all of it)."""
    if not facts.recovery_windows:
        return "unknown", "no collection of this region's vault on record yet", ()
    short, notes = [], []
    for stream, last in sorted(facts.recovery_windows.items()):
        policy = float(last.get("window") or 0.0)
        oldest = last.get("oldest_point")
        reach = facts.now - float(oldest) if oldest is not None else 0.0
        seen = last.get("first_seen")
        history = facts.now - float(seen) if seen is not None else 0.0
        if policy <= 0:
            notes.append(f"{stream} keeps everything ({_ago(reach)} back)")
        elif reach < policy and history >= policy:
            short.append(f"{stream} reaches {_ago(reach)} back, policy {_ago(policy)}")
        else:
            young = " (all its history)" if reach < policy else ""
            notes.append(f"{stream} reaches {_ago(reach)} back{young}, policy {_ago(policy)}")
    cited = tuple(ref(e) for e in of_type(facts.entries, VAULT_GC)[-3:])
    if short:
        return "fail", "recovery window short: " + "; ".join(short), cited
    return "pass", "; ".join(notes), cited


def vault_lock_facts(cfg: Any) -> dict[str, dict[str, Any]]:
    """The configuration half of ``vault-immutable`` from an ``AgentConfig``: for this
    region's vault and each peer's (which this region writes into), the configured lock
    (mode and retain, or none) and the longest recovery window it should cover."""
    windows = [cfg.retention.window] + [
        s.retention.window for s in cfg.streams if s.retention is not None
    ]
    window = 0.0 if 0.0 in windows else max(windows)
    out: dict[str, dict[str, Any]] = {}
    for name, vault, own in [(cfg.region, cfg.vault, True)] + [
        (p.name, p.vault, False) for p in cfg.peers
    ]:
        lock = vault.object_lock
        out[name] = {
            "own": own,
            "mode": None if lock is None else lock.mode,
            "retain": None if lock is None else lock.retain,
            "window": window,
        }
    return out


def vault_immutable(facts: Facts) -> Outcome:
    """Every object the vaults hold written under Object Lock for at least the recovery
    window (configuration), on a bucket that has Object Lock enabled (online check)."""
    if facts.vault_locks is None:
        return "unknown", "the vaults' object_lock configuration was not gathered", ()
    unlocked = sorted(n for n, v in facts.vault_locks.items() if v.get("mode") is None)
    if len(unlocked) == len(facts.vault_locks) and not facts.policy.require_object_lock:
        return "pass", "not required by the policy: vaults are create-only, without Object Lock", ()
    problems, notes = [], []
    if unlocked:
        problems.append("no object_lock configured for vault(s) " + ", ".join(unlocked))
    for name, v in sorted(facts.vault_locks.items()):
        if v.get("mode") is None:
            continue
        retain, window = float(v["retain"]), float(v.get("window") or 0.0)
        if window <= 0 or retain < window:
            want = "the whole history (window 0)" if window <= 0 else _ago(window)
            problems.append(f"vault {name} locks {_ago(retain)}, less than the window {want}")
        if v.get("own") and facts.object_lock is False:
            problems.append(f"vault {name}: object_lock configured but the bucket has none")
        notes.append(f"{name} {v['mode']} {_ago(retain)}")
    if problems:
        return "fail", "; ".join(problems), ()
    if any(v.get("own") for v in facts.vault_locks.values()) and facts.object_lock is None:
        return "unknown", "the vault bucket's Object Lock has not been checked yet", ()
    return "pass", "vault writes locked: " + ", ".join(notes) + "; bucket Object Lock on", ()


Check = Callable[[Facts], Outcome]


@dataclass(frozen=True)
class Control:
    id: str
    title: str
    clauses: tuple[str, ...]
    check: Check


CONTROLS: tuple[Control, ...] = (
    Control(
        "objectives-defined",
        "Recovery objectives defined for every stream",
        ("NIST CP-2", "ISO A.5.29", "HIPAA 164.308(a)(7)(i)", "DORA 11"),
        objectives_defined,
    ),
    Control(
        "restore-drill-current",
        "Restore drill performed within the policy's interval",
        (
            "SOC2 A1.3",
            "ISO A.5.30",
            "NIST CP-4",
            "HIPAA 164.308(a)(7)(ii)(D)",
            "DORA 11",
            "DORA 12",
        ),
        drill_current,
    ),
    Control(
        "restore-within-rto",
        "Measured restore time within the RTO",
        ("SOC2 A1.3", "SOC2 CC7.5", "ISO A.5.30", "NIST CP-10", "DORA 11"),
        restore_within_rto,
    ),
    Control(
        "rpo-within-target",
        "Measured RPO within target over the period",
        ("SOC2 A1.2", "ISO A.8.13", "NIST CP-9", "HIPAA 164.308(a)(7)(ii)(A)", "DORA 12"),
        rpo_within_target,
    ),
    Control(
        "backups-verified",
        "Copies verified (Merkle) recently",
        ("SOC2 A1.2", "ISO A.8.13", "NIST CP-9", "DORA 12"),
        backups_verified,
    ),
    Control(
        "backups-encrypted",
        "Copies encrypted under a key-encryption key",
        ("ISO A.8.13", "NIST CP-9", "HIPAA 164.308(a)(7)(ii)(A)"),
        backups_encrypted,
    ),
    Control(
        "key-age",
        "Key-encryption keys rotated within the maximum age",
        ("ISO A.8.13", "NIST CP-9"),
        key_age,
    ),
    Control(
        "alternate-site",
        "Copies kept in another region ready to serve",
        ("SOC2 A1.2", "ISO A.8.14", "NIST CP-6", "NIST CP-7", "DORA 12"),
        alternate_site,
    ),
    Control(
        "evidence-intact",
        "Evidence log complete, unaltered and signed",
        ("SOC2 CC7.5", "ISO A.5.29", "NIST CP-4", "DORA 11"),
        evidence_intact,
    ),
    Control(
        "recovery-window",
        "Every restore point of the retention window restorable",
        ("SOC2 A1.2", "ISO A.8.13", "NIST CP-9", "DORA 12"),
        recovery_window,
    ),
    Control(
        "vault-immutable",
        "Vault objects under Object Lock for at least the recovery window",
        ("SOC2 A1.2", "ISO A.8.13", "NIST CP-9", "DORA 12"),
        vault_immutable,
    ),
    Control(
        "failover-tested",
        "Failover or switchover exercised within a year",
        ("SOC2 A1.3", "SOC2 CC7.5", "NIST CP-4", "NIST CP-7", "NIST CP-10", "DORA 11"),
        failover_tested,
    ),
)


def evaluate(facts: Facts) -> list[ControlResult]:
    """Every control's result for ``facts``, in ``CONTROLS`` order."""
    out = []
    for c in CONTROLS:
        status, reason, evidence = c.check(facts)
        out.append(ControlResult(c.id, c.title, status, reason, c.clauses, tuple(evidence)))
    return out
