"""The restore drill: a cold restore from this region's vault into scratch copies, timed.

A ``postgres`` stream is restored as a running cluster and compared table by
table with this region's standby (``agent/drills/postgres.py``); an
``objects`` stream into a scratch bucket compared with the mirror
(``agent/drills/objects.py``); an ``artifacts`` stream into a scratch model
directory compared with the model store (``agent/drills/artifacts.py``).
For every
other stream whose segments this region's vault holds, the drill reads
the segments in log order (all, or those sealed up to ``--at``), opens each
with full verification (authentication, Merkle root, name against header),
checks continuity (next seq, start where the previous ended), and writes the
records into a scratch copy under ``<data_dir>/drills/<id>/``. It then reads
the scratch copy back and compares three xxh3-128 Merkle roots over the
records: the vault's (from the authenticated segments), the restored copy's
(from disk), and the source's at the same position where the kind can
reproduce it (the synthetic generator can, from each record's index and
time). The scratch copies are removed at the end, whatever happened.

Phases, each timed: ``prepare`` (scratch space, store and keys),
``restore`` (fetch, verify, apply), ``verify`` (read back, Merkle compare),
``teardown``. The achieved RTO of a cold restore is prepare + restore +
verify: the time until a verified copy is ready.

The result is a report dict with the fields of ``verifiers/report.py``
(``kind`` = ``drill.restore``) plus ``rto_seconds``, ``rto_target``,
``phases`` and per-stream details. Recording it as evidence is the caller's
job (``run_restore_drill`` does both).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from agent.config import AgentConfig, StreamConfig
from replicators.errors import IntegrityError
from replicators.keys import KeyProvider, build_key_provider
from replicators.logread import LogWalk
from replicators.s3 import S3Store
from replicators.synthetic import SyntheticTarget, make_record, parse_record, read_applied_log
from replicators.vault import Vault
from verifiers.merkle import MerkleBuilder

KIND = "drill.restore"
# Kinds restored by their own restore code into a scratch copy of the real thing; each module
# has ``restore_and_compare(stream, store, keys, *, drill_id, at, result)``.
KIND_DRILLS = {
    "postgres": "agent.drills.postgres",
    "objects": "agent.drills.objects",
    "artifacts": "agent.drills.artifacts",
}


@dataclass
class StreamResult:
    """One stream's restore: what was restored, the three roots, and any problem."""

    stream: str
    kind: str
    method: str = "vault-replay"
    segments: int = 0
    records: int = 0
    bytes: int = 0
    start: str | None = None
    end: str | None = None
    last_source_time: float | None = None
    roots: dict[str, str] = field(default_factory=dict)
    equal: bool = False
    problem: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    tables: dict[str, dict[str, str | None]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        restored = self.segments > 0 or self.method != "vault-replay"
        return self.problem is None and self.equal and restored


class _Clock:
    """Named phases, each the sum of the time spent in it."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    def add(self, name: str, since: float) -> float:
        now = time.monotonic()
        self.phases[name] = round(self.phases.get(name, 0.0) + now - since, 6)
        return now


def source_root(stream: StreamConfig, records: list[bytes]) -> str | None:
    """The root the source would give for the same records, where the kind can tell.

    Synthetic: regenerate each record from its index and due time with the
    stream's options. Other kinds without their own restore: None.
    """
    if stream.kind != "synthetic":
        return None
    builder = MerkleBuilder()
    opts = stream.synthetic
    for record in records:
        index, due, _ = parse_record(record)
        builder.add(make_record(index, due, opts.record_size, opts.compressible))
    return builder.root().hex()


async def _replay(
    stream: StreamConfig,
    vault: Vault,
    keys: KeyProvider,
    scratch: SyntheticTarget,
    at: float | None,
    result: StreamResult,
) -> str:
    """Fetch, verify and apply every segment (up to ``at``); return the vault's root."""
    builder = MerkleBuilder()
    walk = LogWalk(vault, keys, stream.name)
    bar = tqdm(desc=f"restore {stream.name}", unit="seg", file=sys.stderr, disable=None)
    try:
        async with contextlib.aclosing(walk.read(done=bar.update)) as segments:
            async for ref, opened in segments:
                header = opened.header
                if at is not None and header.last_source_time > at:
                    break
                await scratch.apply(ref, header, opened.records)
                for record in opened.records:
                    builder.add(record)
                result.segments += 1
                result.records += len(opened.records)
                result.start = result.start or header.start
                result.end, result.last_source_time = header.end, header.last_source_time
                result.bytes = walk.bytes  # the segments read so far
    finally:
        bar.close()
    return builder.root().hex()


async def _restore_stream(
    stream: StreamConfig,
    vault: Vault,
    keys: KeyProvider,
    scratch_dir: Path,
    at: float | None,
    evidence: list[dict[str, Any]] | None = None,
) -> StreamResult:
    result = StreamResult(stream.name, stream.kind)
    if stream.kind in KIND_DRILLS and getattr(stream, stream.kind) is not None:
        module = importlib.import_module(KIND_DRILLS[stream.kind])
        drill_id = f"{scratch_dir.name}-{os.getpid()}".lower()
        extra = {"evidence": evidence} if stream.kind == "postgres" else {}
        await module.restore_and_compare(
            stream, vault.store, keys, drill_id=drill_id, at=at, result=result, **extra
        )
        return result
    scratch = SyntheticTarget(scratch_dir / stream.name)
    clock = _Clock()
    t = time.monotonic()
    try:
        result.roots["vault"] = await _replay(stream, vault, keys, scratch, at, result)
        t = clock.add("restore", t)
        restored = list(read_applied_log(scratch.log_path))
        builder = MerkleBuilder()
        for record in restored:
            builder.add(record)
        result.roots["restored"] = builder.root().hex()
        src = source_root(stream, restored)
        if src is not None:
            result.roots["source"] = src
        result.equal = len(set(result.roots.values())) == 1 and len(restored) == result.records
        if not result.equal:
            result.problem = "Merkle roots differ: " + ", ".join(
                f"{k} {v[:12]}" for k, v in result.roots.items()
            )
        elif result.segments == 0:
            result.problem = "nothing to restore: the vault holds no segment of this stream"
        clock.add("verify", t)
    except IntegrityError as exc:
        result.problem = f"integrity: {exc}"
        clock.add("restore", t)
    result.seconds = clock.phases
    return result


def _report(
    cfg: AgentConfig,
    results: list[StreamResult],
    phases: dict[str, float],
    started: float,
    at: float | None,
) -> dict[str, Any]:
    rto = round(sum(phases.get(p, 0.0) for p in ("prepare", "restore", "verify")), 6)
    ok = bool(results) and all(r.ok for r in results)
    equal = bool(results) and all(r.equal for r in results)
    restored = sum(r.records for r in results)
    summary = (
        f"restored {len(results)} stream(s), {restored} records, in {rto:.2f}s "
        f"(RTO target {cfg.policy.rto_seconds:g}s); Merkle roots "
        + ("equal" if equal else "DIFFER")
    )
    return {
        "kind": KIND,
        "stream": ",".join(r.stream for r in results) or "-",
        "region": cfg.region,
        "started_at": started,
        "finished_at": time.time(),
        "at": at if at is not None else "latest",
        "ok": ok,
        "equal": equal,
        "summary": summary,
        "rto_seconds": rto,
        "rto_target": cfg.policy.rto_seconds,
        "phases": phases,
        "roots": {f"{r.stream}/{k}": v for r in results for k, v in r.roots.items()},
        "counts": {r.stream: r.records for r in results},
        "differences": [{"what": r.problem, "where": r.stream} for r in results if r.problem],
        "streams": [asdict(r) | {"ok": r.ok} for r in results],
    }


async def restore_drill(
    cfg: AgentConfig,
    *,
    at: float | None = None,
    streams: list[str] | None = None,
    scratch_root: Path | None = None,
    evidence: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run one restore drill; return its (unsigned) report. Never leaves scratch copies.

    ``streams`` limits the drill to those names (default: every configured
    stream). ``evidence``: this region's evidence entries, where a drill at ``at``
    finds the state to compare with (``agent.drills.postgres.recorded_state``).
    Integrity problems are reported per stream (``ok`` false), not raised;
    storage and key errors propagate (the drill could not run).
    """
    started = time.time()
    chosen = [s for s in cfg.streams if streams is None or s.name in streams]
    drill_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    scratch = (scratch_root or cfg.data_dir / "drills") / drill_id
    clock = _Clock()
    t = time.monotonic()
    results: list[StreamResult] = []
    try:
        async with AsyncExitStack() as stack:
            scratch.mkdir(parents=True, exist_ok=True)
            store = await S3Store.open(cfg.vault)
            stack.push_async_callback(store.aclose)
            keys = build_key_provider(cfg.keys)
            stack.push_async_callback(keys.aclose)
            t = clock.add("prepare", t)
            for stream in chosen:
                result = await _restore_stream(stream, Vault(store), keys, scratch, at, evidence)
                results.append(result)
                for name, seconds in result.seconds.items():
                    clock.phases[name] = round(clock.phases.get(name, 0.0) + seconds, 6)
            t = time.monotonic()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        clock.add("teardown", t)
    report = _report(cfg, results, clock.phases, started, at)
    report["scratch_removed"] = not scratch.exists()
    return report
