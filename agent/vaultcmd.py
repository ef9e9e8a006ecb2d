"""``dragent vault ls|verify``: list and verify one stream's segments in this region's vault.

``verify`` opens every segment (authentication, Merkle root, name against
header) and checks the chain has no gap or overlap; it names every damaged
segment, with the positions it lies between, and every break in the chain
(not only the first) and exits 1 if there is any. Segments of an epoch that a newer one
superseded (``replicators.lineage``) are named as stale, left out of the
chain, and never make the chain fail: sinks quarantine them. A segment missing
from an epoch (a hole in seq) is named too, with the positions it lies between.
``verify --repair`` re-ships what a postgres stream lost from its source
(``agent.vaultrepair``) and verifies again.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from agent.config import AgentConfig
from agent.jsonout import print_json
from replicators.logread import LogWalk
from replicators.segment import OpenedSegment
from replicators.vault import SegmentRef, open_vault


@dataclass
class Walk:
    """One walk of a stream's log: a row per readable segment, every problem found
    (segment key, message), and the superseded segments left out."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    covers: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    """For each segment that could not be opened, the positions it lies between: the end
    of the readable segment before it and the start of the one after (None: the log's
    start or end). Neighbours damaged together share the range."""
    missing: list[str] = field(default_factory=list)
    """Segments absent from the vault: holes in seq within an epoch."""

    @property
    def problem(self) -> str:
        return self.problems[0][1] if self.problems else ""


async def _walk(cfg: AgentConfig, stream: str, verify: bool) -> Walk:
    """Every segment opened (and, with ``verify``, checked for continuity); a damaged
    segment is named and the walk goes on, so every damaged one is named."""
    walk = Walk()
    unreadable: list[str] = []  # since the last readable segment
    last: SegmentRef | None = None
    async with open_vault(cfg.vault, cfg.keys) as (vault, keys):
        log = LogWalk(vault, keys, stream)
        async for seen in log.check():
            holes = _holes(last, seen.ref)
            last = seen.ref
            for key in holes:
                walk.problems.append((key, "missing: no segment under this name"))
                walk.missing.append(key)
            unreadable += holes
            gap = bool(holes) and "gap: expected seq" in str(seen.problem)  # named as missing
            if seen.opened is None or (verify and seen.problem and not gap):
                walk.problems.append((seen.ref.key, str(seen.problem)))
            if seen.opened is None:
                unreadable.append(seen.ref.key)
                continue
            row = _row(seen.ref.epoch, seen.ref.seq, seen.opened, seen.size)
            before = walk.rows[-1]["end"] if walk.rows else None
            walk.covers |= {key: (before, row["start"]) for key in unreadable}
            unreadable = []
            walk.rows.append(row)
            if verify and len(walk.rows) % 100 == 0 and sys.stderr.isatty():
                print(f"\rverified {len(walk.rows)} segments", end="", file=sys.stderr, flush=True)
        walk.stale = sorted(r.key for r in log.stale)
    last = walk.rows[-1]["end"] if walk.rows else None
    walk.covers |= {key: (last, None) for key in unreadable}
    if verify and len(walk.rows) >= 100 and sys.stderr.isatty():
        print(file=sys.stderr)
    return walk


def _holes(last: SegmentRef | None, ref: SegmentRef) -> list[str]:
    """The names of the segments missing between ``last`` and ``ref`` of one epoch (a
    hole across an epoch change is named by the continuity check: its epoch is unknown)."""
    if last is None or last.epoch != ref.epoch:
        return []
    return [SegmentRef(ref.epoch, seq, ref.stream).key for seq in range(last.seq + 1, ref.seq)]


def _row(epoch: int, seq: int, opened: OpenedSegment, size: int) -> dict[str, Any]:
    h = opened.header
    return {
        "epoch": epoch,
        "seq": seq,
        "start": h.start,
        "end": h.end,
        "records": h.record_count,
        "bytes": size,
        "key_id": h.key_id,
        "root": opened.root.hex(),
    }


async def vault_ls(cfg: AgentConfig, stream: str, as_json: bool) -> int:
    walk = await _walk(cfg, stream, verify=False)
    rows, problem, stale = walk.rows, walk.problem, walk.stale
    if as_json:
        print_json({"segments": rows, "problem": problem or None, "stale": stale})
    else:
        print(f"{'epoch':>6} {'seq':>8} {'start':>12} {'end':>12} {'records':>8} {'bytes':>10}")
        for r in rows:
            print(
                f"{r['epoch']:>6} {r['seq']:>8} {r['start']:>12} {r['end']:>12} "
                f"{r['records']:>8} {r['bytes']:>10}"
            )
        for key, message in walk.problems:
            print(f"problem: {key}: {message}")
        for key in stale:
            print(f"stale (superseded epoch, quarantined): {key}")
    return 1 if problem else 0


async def verify_summary(cfg: AgentConfig, stream: str) -> dict[str, Any]:
    """Verify ``stream`` in this region's vault; the summary ``vault verify`` prints."""
    started = time.monotonic()
    walk = await _walk(cfg, stream, verify=True)
    rows, problem, stale = walk.rows, walk.problem, walk.stale
    return {
        "stream": stream,
        "segments": len(rows),
        "records": sum(r["records"] for r in rows),
        "first": rows[0]["start"] if rows else None,
        "end": rows[-1]["end"] if rows else None,
        "ok": not problem,
        "problem": problem or None,
        "problems": [
            {"segment": key, "error": message, "covers": walk.covers.get(key)}
            for key, message in walk.problems
        ],
        "damaged": sorted({key for key, _ in walk.problems}),
        "missing": walk.missing,
        "stale": stale,
        "seconds": round(time.monotonic() - started, 3),
    }


async def vault_verify(cfg: AgentConfig, stream: str, as_json: bool, repair: bool = False) -> int:
    """Verify ``stream``; with ``repair``, re-ship its damaged and missing segments from
    the source (``agent.vaultrepair``, postgres streams) and verify the whole log again.
    Exit status 1 if a problem remains (a run not repaired, or the log still broken)."""
    summary = await verify_summary(cfg, stream)
    if repair and summary["problems"]:
        from agent.vaultrepair import repair_stream

        outcomes = await repair_stream(cfg, stream)
        before = summary
        summary = await verify_summary(cfg, stream)
        summary["before_repair"] = {k: before[k] for k in ("problems", "damaged", "missing")}
        summary["repairs"] = [o.describe() for o in outcomes]
        if any(not o.repaired for o in outcomes):
            summary["ok"] = False
            summary["problem"] = summary["problem"] or "damaged segments remain unrepaired"
    _print_verify(summary, as_json)
    return 0 if summary["ok"] else 1


def _print_verify(summary: dict[str, Any], as_json: bool) -> None:
    stream, problem, stale = summary["stream"], summary["problem"], summary["stale"]
    if as_json:
        print_json(summary)
    else:
        for item in summary.get("repairs", []):
            lo, hi = item["covers"]
            what = ", ".join(item["segments"])
            span = f"positions {lo or 'the start'} to {hi or 'the end'}"
            verdict = "repaired" if item["repaired"] else f"NOT repaired: {item['why']}"
            print(f"repair {what} ({span}): {verdict}")
        verdict = "ok" if not problem else f"FAILED: {len(summary['problems'])} problems"
        print(
            f"{stream}: {summary['segments']} segments, {summary['records']} records, "
            f"positions [{summary['first']}, {summary['end']}) — {verdict}"
        )
        for item in summary["problems"]:
            where = ""
            if item["covers"] is not None:
                lo, hi = item["covers"]
                where = f" (lost positions from {lo or 'the start'} to {hi or 'the end'})"
            print(f"  {item['segment']}: {item['error']}{where}")
        for key in stale:
            print(f"  stale (superseded epoch, quarantined by sinks): {key}")
