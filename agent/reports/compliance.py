"""``dragent report compliance``: read the evidence logs, evaluate, build, sign; and check.

The report covers this region's log and every peer's (read from the peer's
vault with the credentials in the configuration). Controls are evaluated
as of the end of the period, from the evidence written up to then. The
signed JSON names each log's head (seq and hash) at report time:
``check_report`` verifies the signature and that each head is still in its
log unchanged, so a report cannot outlive a rewritten log unnoticed.
"""

from __future__ import annotations

import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.compliance import controls as c
from agent.compliance.keyage import key_ages, named_keys
from agent.config import AgentConfig
from agent.evidence import EvidenceLog, digest, entry_key
from agent.evidence.chain import check_chain
from agent.reports.data import build_report
from replicators.errors import IntegrityError, NotFound
from verifiers.report import check, load_or_create_signing_key, sign


async def _logs(cfg: AgentConfig) -> list[EvidenceLog]:
    own = await EvidenceLog.open(cfg)
    await own.ensure()  # a region that recorded nothing yet starts its log here
    logs = [own]
    for peer in cfg.peers:
        logs.append(await EvidenceLog.reader(peer.name, peer.vault))
    return logs


async def read_all(cfg: AgentConfig) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every entry of every log, and per region its head and chain verdict."""
    entries: list[dict[str, Any]] = []
    heads: dict[str, dict[str, Any]] = {}
    for log in await _logs(cfg):
        try:
            items = await log.raw_entries()
            chain = log.check(items) if log.region == cfg.region else check_chain(log.region, items)
        finally:
            await log.aclose()
        if not items and log.region != cfg.region:
            continue  # a peer that has recorded nothing yet
        entries += chain.entries
        seq, hash_ = chain.head or (None, None)
        heads[log.region] = {
            "seq": seq,
            "hash": hash_,
            "entries": len(items),
            "chain_ok": chain.ok,
            "problems": chain.problems[:10],
        }
    return entries, heads


async def compliance_report(
    cfg: AgentConfig, start: float, end: float, *, now: float | None = None
) -> dict[str, Any]:
    """The signed compliance report for ``[start, end]`` (unix seconds)."""
    now = time.time() if now is None else now
    entries, heads = await read_all(cfg)
    upto = [e for e in entries if float(e["time"]) <= end]
    keys = key_ages(named_keys(cfg))
    own = heads.get(cfg.region, {})
    facts = c.Facts(
        now=min(end, now),
        policy=cfg.policy,
        streams=[s.name for s in cfg.streams],
        peers=[p.name for p in cfg.peers],
        entries=upto,
        key_created={name: created for name, (_, created) in keys.items()},
        encrypted={name: True for name in named_keys(cfg)},  # a KEK is mandatory per key
        chain_ok=all(h["chain_ok"] for h in heads.values()) if own else None,
    )
    report = build_report(
        region=cfg.region,
        entries=entries,
        start=start,
        end=end,
        policy=cfg.policy,
        controls=c.evaluate(facts),
        heads=heads,
        generated_at=now,
    )
    return sign(report, load_or_create_signing_key(cfg.signing_key_path))


async def check_report(cfg: AgentConfig, report: dict[str, Any], public: Ed25519PublicKey) -> None:
    """Raise ``IntegrityError`` unless the signature holds and every cited head is in its log."""
    check(report, public)
    vaults = {cfg.region: cfg.vault, **{p.name: p.vault for p in cfg.peers}}
    for region, head in report.get("evidence", {}).items():
        if head.get("seq") is None or region not in vaults:
            continue
        log = await EvidenceLog.reader(region, vaults[region])
        key = entry_key(region, int(head["seq"]))
        try:
            raw = await log.store.get(key)
        except NotFound:
            raise IntegrityError("entry cited by the report is gone", where=key) from None
        finally:
            await log.aclose()
        if digest(raw) != head["hash"]:
            raise IntegrityError("entry cited by the report has changed", where=key)
