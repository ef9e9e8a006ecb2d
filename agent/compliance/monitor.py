"""The compliance monitor: evidence + live metrics -> controls, continuously.

``ComplianceMonitor(cfg, live_rpo=...)`` is a component of the daemon:

- ``collector``: a Prometheus ``Collector`` to register on the agent's
  registry (``dragent_compliance_control{control,status}`` and the drill and
  key-age series the alert rules use);
- ``status()``: a dict for ``/status``;
- ``async run(stop)``: until ``stop`` is set, every second take the live RPO
  into a running maximum; every ``rpo_sample_every`` record that maximum as
  an ``rpo.sample`` evidence entry (on a region that ships); every
  ``evaluate_every`` read new evidence, record key rotations it sees, the
  failover engine's records (``<data_dir>/failovers/``), gaps in a stream's
  log (``<data_dir>/gaps/``) and finished
  on-demand verifications (``verifications()``: the agent's verify jobs), run a restore
  drill when one is due (passive region, ``drill_schedule``), then evaluate
  the controls and record status changes as evidence.

Storage errors are logged (rate-limited) and the step is tried again at the
next tick; the last results stay, marked with their evaluation time. An
agent whose signing key is not the evidence chain's (``SigningKeyError``)
records nothing, still evaluates the controls, logs it (rate-limited) and
reports it in ``status()`` (``evidence_write_refused``) until the chain's key
is installed; status changes seen meanwhile are recorded then.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from agent.compliance import controls as c
from agent.compliance.keyage import key_ages, key_versions, named_keys
from agent.compliance.metrics import ComplianceCollector
from agent.config import AgentConfig
from agent.evidence import EvidenceLog
from agent.evidence.chain import SigningKeyError
from replicators import logs
from replicators.errors import DragentError, StorageError
from replicators.postgres import gaps
from replicators.postgres import gc as vault_gc

_FULL_CHECK_EVERY = 3600.0  # re-read and re-check the whole chain this often
_DRILL_RETRY = 3600.0  # after a failed scheduled drill


class ComplianceMonitor:
    def __init__(
        self,
        cfg: AgentConfig,
        *,
        live_rpo: Callable[[], Mapping[str, float]] | None = None,
        clock: Callable[[], float] = time.time,
        drill_after: float = _DRILL_RETRY,
        verifications: Callable[[], Iterable[Any]] | None = None,
    ) -> None:
        self.cfg = cfg
        self._live_rpo = live_rpo or dict
        self._verifications = verifications or list
        self._clock = clock
        self.log = logs.get("compliance", region=cfg.region)
        self._errors = logs.RateLimited(300.0)
        self.results: list[c.ControlResult] = []
        self.evaluated_at: float | None = None
        self.chain_ok: bool | None = None
        self.evidence_refused: str | None = None  # why this agent may not append, if so
        self._recorded: dict[str, str] = {}  # control -> status, as last recorded
        self.object_lock: bool | None = None
        self._evidence: EvidenceLog | None = None
        self._raw: list[tuple[str, bytes]] = []
        self._own: list[dict[str, Any]] = []
        self._peers: dict[str, list[dict[str, Any]]] = {}
        self._full_at = 0.0
        self._rpo_max: dict[str, float] = {}
        self._rpo_since = clock()
        self.keys: dict[str, tuple[str | None, float | None]] = {}
        self.key_problems: dict[str, str] = {}
        # the first scheduled drill waits ``drill_after`` seconds: an agent that just
        # started (or a test's) does not launch a drill at once
        self._drill_attempt = clock() - _DRILL_RETRY + drill_after
        self.collector = ComplianceCollector(self)

    def update_config(self, cfg: AgentConfig) -> None:
        """Take a reloaded configuration (same region)."""
        self.cfg = cfg

    # -- evidence ------------------------------------------------------------------

    async def evidence(self) -> EvidenceLog:
        if self._evidence is None:
            self._evidence = await EvidenceLog.open(self.cfg)
            await self._evidence.ensure()
        return self._evidence

    async def refresh(self, now: float) -> None:
        """Read new entries of this region's log (all of it, hourly) and of the peers'."""
        log = await self.evidence()
        full = now - self._full_at >= _FULL_CHECK_EVERY or not self._raw
        if full:
            self._raw, self._full_at = await log.raw_entries(), now
        else:
            last = c_seq(self._raw[-1][0])
            self._raw += await log.raw_entries(after=last)
        report = await asyncio.to_thread(log.check, self._raw)
        self.chain_ok, self._own = report.ok, well_formed(report.entries)
        if not report.ok and self._errors.allow("chain") is not None:
            self.log.error("evidence log damaged", problems=report.problems[:5])
        self.object_lock = await log.lock_enabled()
        for peer in self.cfg.peers:
            try:
                self._peers[peer.name] = await self._peer_entries(peer.name, peer.vault)
            except StorageError as exc:  # the controls are still evaluated without it
                if self._errors.allow(f"peer {peer.name}") is not None:
                    self.log.warning("peer evidence unreadable", peer=peer.name, error=f"{exc}")

    async def _peer_entries(self, region: str, vault: Any) -> list[dict[str, Any]]:
        reader = await EvidenceLog.reader(region, vault)
        try:
            return well_formed(reader.check(await reader.raw_entries()).entries)
        finally:
            await reader.aclose()

    def entries(self) -> list[dict[str, Any]]:
        """Every entry known: this region's and its peers'."""
        return [*self._own, *(e for entries in self._peers.values() for e in entries)]

    # -- facts -----------------------------------------------------------------------

    def observe_rpo(self) -> None:
        for stream, rpo in self._live_rpo().items():
            self._rpo_max[stream] = max(self._rpo_max.get(stream, 0.0), rpo)

    async def flush_rpo(self, now: float) -> dict[str, Any] | None:
        """Record the highest RPO seen per stream since the last sample (if any stream ships)."""
        if not self._rpo_max:
            self._rpo_since = now
            return None
        policy = self.cfg.policy
        streams = {
            s: {"max_rpo": round(v, 6), "target": policy.rpo_target(s)}
            for s, v in sorted(self._rpo_max.items())
        }
        data = {"period": [self._rpo_since, now], "streams": streams}
        entry = await (await self.evidence()).append(c.RPO_SAMPLE, data, at=now)
        self._rpo_max, self._rpo_since = {}, now
        return entry

    async def record_keys(self, now: float) -> None:
        """Append a ``key.rotation`` entry for every key whose current version is new. A
        new version in a key file that no longer holds the version recorded before is a
        replaced file, not a rotation (what was sealed under the old one cannot be opened):
        nothing is recorded, the problem is kept (``key_problems``) and fails key-age."""
        keys = named_keys(self.cfg)
        self.keys = key_ages(keys)
        rotations = [e["data"] for e in self._own if e.get("type") == c.KEY_ROTATION]
        seen = {(d.get("key"), d.get("key_id")) for d in rotations}
        last = {d.get("key"): d.get("key_id") for d in rotations}
        for name, (key_id, created) in sorted(self.keys.items()):
            if key_id is None or (name, key_id) in seen:
                continue
            held = key_versions(keys[name])
            if last.get(name) is not None and held is not None and last[name] not in held:
                self.key_problems[name] = (
                    f"{name}: the key file no longer holds version {last[name]}: replaced, "
                    "not rotated; segments sealed under it cannot be opened"
                )
                self.log.error("key file replaced, not rotated", key=name, missing=last[name])
                continue
            self.key_problems.pop(name, None)
            data = {"key": name, "key_id": key_id, "created_at": created}
            self._own.append(await (await self.evidence()).append(c.KEY_ROTATION, data))

    async def record_failovers(self) -> int:
        """Append the failover engine's records (``<data_dir>/failovers/*.json``, one per
        failover or switchover) not yet in the log, as ``failover``/``switchover`` entries.
        Returns how many were appended. A file that is not a record is skipped."""
        seen = {
            (e["type"], e["data"].get("epoch"))
            for e in self._own
            if e["type"] in (c.FAILOVER, c.SWITCHOVER)
        }
        added = 0
        for record in await asyncio.to_thread(_failover_records, self.cfg.data_dir / "failovers"):
            kind = record.get("kind")
            if kind not in (c.FAILOVER, c.SWITCHOVER) or (kind, record.get("epoch")) in seen:
                continue
            data = {**record, "ok": not record.get("errors")}
            self._own.append(await (await self.evidence()).append(kind, data))
            added += 1
        return added

    async def record_gaps(self) -> int:
        """Append each gap in a stream's log (``<data_dir>/gaps/``: WAL a peer's vault never
        received, after a slot was re-seeded) not yet in the log, as a ``stream.gap``
        entry: a hole in the recovery window. Returns how many were appended."""
        seen = {e["data"].get("id") for e in self._own if e["type"] == c.STREAM_GAP}
        added = 0
        found = await asyncio.to_thread(gaps.load, self.cfg.data_dir / gaps.DIRECTORY)
        for gap in found:
            if gap.id in seen:
                continue
            data = {"id": gap.id, **gap.describe(), "recovery_window": "gap"}
            self._own.append(await (await self.evidence()).append(c.STREAM_GAP, data))
            added += 1
        return added

    async def record_gc(self) -> int:
        """Append each pass of the vault's collector that deleted or skipped something
        (``<data_dir>/gc/``) not yet in the log, as a ``vault.gc`` entry. Returns how many."""
        seen = {(e["data"].get("stream"), e["data"].get("at")) for e in self._own
                if e["type"] == c.VAULT_GC}  # fmt: skip
        added = 0
        for rec in await asyncio.to_thread(vault_gc.load, self.cfg.data_dir):
            if (rec.get("stream"), rec.get("at")) in seen:
                continue
            fields = ("stream", "at", "deleted", "bytes_deleted", "locked", "first_deleted",
                      "last_deleted", "floor_backup", "kept_backups", "oldest_point",
                      "recovery_window", "window")  # fmt: skip
            data = {k: rec.get(k) for k in fields}
            data["locked"] = len(rec.get("locked") or [])
            self._own.append(await (await self.evidence()).append(c.VAULT_GC, data))
            added += 1
        return added

    async def record_verifications(self) -> int:
        """Append each finished on-demand verification (a job with ``id``, ``stream``,
        ``state`` and a signed ``report``) not yet in the log, as a ``verification`` entry."""
        seen = {e["data"].get("job") for e in self._own if e["type"] == c.VERIFICATION}
        added = 0
        for job in list(self._verifications()):
            report = getattr(job, "report", None)
            if getattr(job, "state", "") != "done" or not report or job.id in seen:
                continue
            fields = ("kind", "stream", "ok", "summary", "at", "roots", "counts")
            data = {k: report.get(k) for k in fields} | {
                "job": job.id,
                "report_signature": (report.get("signature") or {}).get("value"),
            }
            self._own.append(await (await self.evidence()).append(c.VERIFICATION, data))
            added += 1
        return added

    def facts(self, now: float) -> c.Facts:
        cfg = self.cfg
        return c.Facts(
            now=now,
            policy=cfg.policy,
            streams=[s.name for s in cfg.streams],
            peers=[p.name for p in cfg.peers],
            entries=self.entries(),
            live_rpo=dict(self._live_rpo()),
            key_created={name: created for name, (_, created) in self.keys.items()},
            key_problems=dict(self.key_problems),
            encrypted={name: True for name in named_keys(cfg)},  # a KEK is mandatory per key
            chain_ok=self.chain_ok,
            object_lock=self.object_lock,
            recovery_windows=vault_gc.latest(self.cfg.data_dir),
            vault_locks=c.vault_lock_facts(cfg),
        )

    # -- drills ----------------------------------------------------------------------

    def drill_due(self, now: float) -> bool:
        cfg = self.cfg
        if cfg.role != "passive" or not cfg.policy.drill_schedule or not cfg.streams:
            return False
        if now - self._drill_attempt < min(_DRILL_RETRY, cfg.policy.drill_every):
            return False
        ok = [e for e in c.of_type(self._own, c.DRILL_RESTORE) if e["data"].get("ok")]
        return not ok or now - float(ok[-1]["time"]) >= cfg.policy.drill_every

    async def drill(self, now: float) -> None:
        from agent.drills import run_restore_drill

        self._drill_attempt = now
        self.log.info("restore drill starting")
        report, entry = await run_restore_drill(self.cfg, await self.evidence())
        self._own.append(entry)
        self.log.info("restore drill finished", ok=report["ok"], rto=report["rto_seconds"])

    # -- evaluation ------------------------------------------------------------------

    async def evaluate_once(self, now: float | None = None) -> list[c.ControlResult]:
        """Refresh evidence, record key rotations, drill if due, evaluate, record changes."""
        now = self._clock() if now is None else now
        await self.refresh(now)
        if not await self._writable():  # evaluate all the same, record nothing
            self.keys = key_ages(named_keys(self.cfg))
            results = c.evaluate(self.facts(now))
            self.results, self.evaluated_at = results, now
            return results
        await self.record_keys(now)
        await self.record_failovers()
        await self.record_gaps()
        await self.record_gc()
        await self.record_verifications()
        if self.drill_due(now):
            await self.drill(now)
        results = c.evaluate(self.facts(now))
        await self._record_changes(results)
        self.results, self.evaluated_at = results, now
        return results

    async def _record_changes(self, results: list[c.ControlResult]) -> None:
        before = self._recorded
        changes = [
            {"control": r.control, "from": before.get(r.control), "to": r.status, "why": r.reason}
            for r in results
            if before.get(r.control) != r.status
        ]
        if changes:
            await (await self.evidence()).append(c.CONTROL_CHANGE, {"changes": changes})
            for ch in changes:
                self.log.info("control status", control=ch["control"], status=ch["to"])
        self._recorded = {r.control: r.status for r in results}

    async def _writable(self) -> bool:
        """Whether this agent's signing key may extend the evidence chain now."""
        try:
            await (await self.evidence()).check_signer()
        except SigningKeyError as exc:
            self._refused(exc)
            return False
        if self.evidence_refused is not None:
            self._errors.forget("evidence refused")
            self.log.info("evidence log: this agent's signing key is the chain's again")
        self.evidence_refused = None
        return True

    def _refused(self, exc: SigningKeyError) -> None:
        self.evidence_refused = str(exc)
        held = self._errors.allow("evidence refused")
        if held is not None:
            self.log.error("evidence not recorded: signing key refused", error=str(exc), held=held)

    async def run(self, stop: asyncio.Event) -> None:
        """Observe, sample and evaluate until ``stop`` is set (see the module docstring)."""
        next_eval = next_sample = 0.0
        try:
            while not stop.is_set():
                now = self._clock()
                self.observe_rpo()
                if now >= next_sample:
                    if next_sample:
                        await self._step("rpo sample", self.flush_rpo(now))
                    next_sample = now + self.cfg.policy.rpo_sample_every
                if now >= next_eval:
                    await self._step("evaluation", self.evaluate_once(now))
                    next_eval = now + self.cfg.policy.evaluate_every
                try:
                    async with asyncio.timeout(1.0):
                        await stop.wait()
                except TimeoutError:
                    pass
        finally:
            await self.aclose()

    async def _step(self, what: str, step: Any) -> None:
        # Compliance must never take replication down with it: any failure of a step is
        # logged (rate-limited) and the step runs again at its next tick.
        try:
            await step
        except SigningKeyError as exc:  # nothing written; evaluations go on without appends
            self._refused(exc)
        except Exception as exc:
            held = self._errors.allow(what)
            if held is not None:
                level = "warning" if isinstance(exc, DragentError | OSError) else "error"
                error = f"{type(exc).__name__}: {exc}"
                getattr(self.log, level)(f"{what} failed", error=error, held=held)

    def status(self) -> dict[str, Any]:
        counts = {s: sum(r.status == s for r in self.results) for s in c.STATUSES}
        return {
            "evaluated_at": self.evaluated_at,
            "evidence_chain_ok": self.chain_ok,
            "evidence_write_refused": self.evidence_refused,
            "object_lock": self.object_lock,
            "counts": counts,
            "controls": [r.as_dict() for r in self.results],
        }

    def last_success(self, kinds: tuple[str, ...]) -> float | None:
        ok = [e for e in c.of_type(self.entries(), *kinds) if e["data"].get("ok")]
        return float(ok[-1]["time"]) if ok else None

    async def aclose(self) -> None:
        if self._evidence is not None:
            await self._evidence.aclose()
            self._evidence = None


def _failover_records(folder: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def well_formed(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries with the fields the controls read (a damaged one is left out, not fatal)."""
    return [
        e
        for e in entries
        if isinstance(e.get("time"), int | float)
        and isinstance(e.get("type"), str)
        and isinstance(e.get("data"), dict)
    ]


def c_seq(key: str) -> int:
    """The seq of an evidence entry key."""
    return int(key.rsplit("/", 1)[1].split(".")[0])
