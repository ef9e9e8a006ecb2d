"""``dragent vault ls|verify``: list and verify one stream's segments in this region's vault.

``verify`` opens every segment (authentication, Merkle root, name against
header) and checks the chain has no gap or overlap; it exits 1 on the first
problem and names the segment. Segments of an epoch that a newer one
superseded (``replicators.lineage``) are named as stale, left out of the
chain, and never make the chain fail: sinks quarantine them.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from agent.cli import print_json
from agent.config import AgentConfig
from replicators import lineage
from replicators.errors import IntegrityError
from replicators.keys import build_key_provider, unseal
from replicators.s3 import S3Store
from replicators.sink import check_continuity
from replicators.stream import Applied
from replicators.vault import Vault


async def _walk(
    cfg: AgentConfig, stream: str, verify: bool
) -> tuple[list[dict[str, Any]], str, list[str]]:
    store = await S3Store.open(cfg.vault)
    keys = build_key_provider(cfg.keys)
    rows: list[dict[str, Any]] = []
    last: Applied | None = None
    problem = ""
    try:
        refs = [ref async for ref in Vault(store).segments(stream)]
        superseded = set(lineage.stale(refs))
        for ref in refs:
            if ref in superseded:
                continue
            blob = await store.get(ref.key)
            try:
                opened = await unseal(
                    blob, keys, expect_stream=stream, expect_epoch=ref.epoch, expect_seq=ref.seq
                )
                if verify:
                    check_continuity(last, ref, opened.header)
            except IntegrityError as exc:
                problem = str(exc)
                break
            h = opened.header
            last = Applied(ref=ref, end=int(h.end), source_time=h.last_source_time)
            rows.append(
                {
                    "epoch": ref.epoch,
                    "seq": ref.seq,
                    "start": h.start,
                    "end": h.end,
                    "records": h.record_count,
                    "bytes": len(blob),
                    "key_id": h.key_id,
                    "root": opened.root.hex(),
                }
            )
            if verify and len(rows) % 100 == 0 and sys.stderr.isatty():
                print(f"\rverified {len(rows)} segments", end="", file=sys.stderr, flush=True)
    finally:
        await keys.aclose()
        await store.aclose()
    if verify and len(rows) >= 100 and sys.stderr.isatty():
        print(file=sys.stderr)
    return rows, problem, sorted(r.key for r in superseded)


async def vault_ls(cfg: AgentConfig, stream: str, as_json: bool) -> int:
    rows, problem, stale = await _walk(cfg, stream, verify=False)
    if as_json:
        print_json({"segments": rows, "problem": problem or None, "stale": stale})
    else:
        print(f"{'epoch':>6} {'seq':>8} {'start':>12} {'end':>12} {'records':>8} {'bytes':>10}")
        for r in rows:
            print(
                f"{r['epoch']:>6} {r['seq']:>8} {r['start']:>12} {r['end']:>12} "
                f"{r['records']:>8} {r['bytes']:>10}"
            )
        if problem:
            print(f"problem: {problem}")
        for key in stale:
            print(f"stale (superseded epoch, quarantined): {key}")
    return 1 if problem else 0


async def vault_verify(cfg: AgentConfig, stream: str, as_json: bool) -> int:
    started = time.monotonic()
    rows, problem, stale = await _walk(cfg, stream, verify=True)
    summary = {
        "stream": stream,
        "segments": len(rows),
        "records": sum(r["records"] for r in rows),
        "first": rows[0]["start"] if rows else None,
        "end": rows[-1]["end"] if rows else None,
        "ok": not problem,
        "problem": problem or None,
        "stale": stale,
        "seconds": round(time.monotonic() - started, 3),
    }
    if as_json:
        print_json(summary)
    else:
        verdict = "ok" if not problem else f"FAILED: {problem}"
        print(
            f"{stream}: {summary['segments']} segments, {summary['records']} records, "
            f"positions [{summary['first']}, {summary['end']}) — {verdict}"
        )
        for key in stale:
            print(f"  stale (superseded epoch, quarantined by sinks): {key}")
    return 0 if not problem else 1
