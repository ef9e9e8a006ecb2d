"""On-demand verification of a ``synthetic`` stream, and the vault walk it is built on.

``walk_segments`` opens every segment of one stream in a vault, in order, and
checks each one fully (authentication of every frame, the Merkle root, the
name against the header) and its continuity with the one before. Any kind
whose segments are a plain log can reuse it.

``verify`` (exposed by ``replicators.synthetic``) returns the unsigned report
(fields in ``verifiers/report.py``): roots and counts of the vault log and,
with ``deep``, of the target's applied log compared record by record with the
vault. Synthetic copies are not repaired: ``repair`` is refused.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from replicators.errors import IntegrityError, SourceError
from replicators.keys import KeyProvider, build_key_provider, unseal
from replicators.s3 import S3Store
from replicators.segment import OpenedSegment
from replicators.sink import check_continuity
from replicators.store import ObjectStore
from replicators.stream import Applied
from replicators.vault import SegmentRef, Vault
from verifiers.merkle import MerkleBuilder, leaf_hash

if TYPE_CHECKING:
    from agent.config import AgentConfig, StreamConfig


@dataclass(frozen=True)
class Walked:
    """One segment that passed every check."""

    ref: SegmentRef
    opened: OpenedSegment
    size: int


async def walk_segments(
    store: ObjectStore, keys: KeyProvider, stream: str
) -> AsyncIterator[Walked]:
    """Yield each segment of ``stream`` in vault order after checking it.

    Raises ``IntegrityError`` (``where`` is the segment's key) at the first segment that
    fails to open or does not follow the previous one; storage errors pass
    through. Reads one segment at a time.
    """
    last: Applied | None = None
    async for ref in Vault(store).segments(stream):
        blob = await store.get(ref.key)
        try:
            opened = await unseal(
                blob, keys, expect_stream=stream, expect_epoch=ref.epoch, expect_seq=ref.seq
            )
            check_continuity(last, ref, opened.header)
        except IntegrityError as exc:  # name the object, whatever the check named
            raise IntegrityError(str(exc), where=ref.key) from None
        h = opened.header
        last = Applied(ref=ref, end=int(h.end), source_time=h.last_source_time)
        yield Walked(ref, opened, len(blob))


def target_log(stream: StreamConfig, agent: AgentConfig) -> Path:
    """Where this region's synthetic target keeps its applied records (agent/streams.py)."""
    return agent.data_dir / "streams" / stream.name / "target" / "applied.log"


async def verify(
    stream: StreamConfig, agent: AgentConfig, *, deep: bool = False, repair: bool = False
) -> dict[str, Any]:
    """Verify ``stream`` in this region's vault (and, with ``deep``, its target).

    Returns the unsigned report; a failed check is a report with ``ok`` false,
    not an exception. Raises ``SourceError`` for ``repair`` (not supported) and
    storage/key errors when the vault cannot be read at all.
    """
    if repair:
        raise SourceError(f"stream {stream.name}: synthetic copies are not repaired")
    started = time.time()
    store = await S3Store.open(agent.vault)
    keys = build_key_provider(agent.keys)
    try:
        vault = await _vault_side(store, keys, stream.name, collect=deep)
    finally:
        await keys.aclose()
        await store.aclose()
    report = _report(stream.name, agent.region, started, vault)
    if deep:
        _compare_target(report, vault, target_log(stream, agent))
    report["finished_at"] = time.time()
    report["ok"] = not report["differences"]
    report["summary"] = _summary(report)
    return report


@dataclass
class _VaultSide:
    segments: int = 0
    records: int = 0
    bytes: int = 0
    end: int | None = None
    last: str | None = None
    root: str = ""
    problem: str | None = None
    where: str | None = None
    leaves: list[bytes] | None = None


async def _vault_side(
    store: ObjectStore, keys: KeyProvider, stream: str, collect: bool
) -> _VaultSide:
    side = _VaultSide(leaves=[] if collect else None)
    tree = MerkleBuilder()
    bar = tqdm(
        desc=f"verify {stream}", unit="seg", file=sys.stderr, disable=not sys.stderr.isatty()
    )
    try:
        async for w in walk_segments(store, keys, stream):
            bar.update()
            side.segments += 1
            side.records += len(w.opened.records)
            side.bytes += w.size
            side.end, side.last = int(w.opened.header.end), w.ref.key
            for record in w.opened.records:
                leaf = leaf_hash(record)
                tree.add_leaf(leaf)
                if side.leaves is not None:
                    side.leaves.append(leaf)
    except IntegrityError as exc:
        side.problem, side.where = str(exc), exc.where or None
    finally:
        bar.close()
    side.root = tree.root().hex()
    return side


def _report(stream: str, region: str, started: float, vault: _VaultSide) -> dict[str, Any]:
    differences = []
    if vault.problem:
        differences.append(
            {"what": vault.problem, "where": vault.where or f"streams/{stream}", "side": "vault"}
        )
    return {
        "kind": "synthetic",
        "stream": stream,
        "region": region,
        "started_at": started,
        "at": {"vault_last_segment": vault.last, "vault_end": vault.end},
        "roots": {"vault": vault.root},
        "counts": {"vault": vault.records, "vault_segments": vault.segments},
        "vault_bytes": vault.bytes,
        "differences": differences,
    }


def _compare_target(report: dict[str, Any], vault: _VaultSide, log: Path) -> None:
    """Compare the target's applied records with the vault's, leaf by leaf.

    The target may be behind the vault (not applied yet) or, while the agent
    runs, ahead of the listing just read (applied since): only the common
    prefix is compared, and both roots are over that prefix.
    """
    from replicators.synthetic import read_applied_log

    leaves = vault.leaves or []
    ours, theirs = MerkleBuilder(), MerkleBuilder()
    first_diff: int | None = None
    applied = 0
    for i, record in enumerate(read_applied_log(log)):
        applied = i + 1
        if i >= len(leaves):
            continue
        leaf = leaf_hash(record)
        theirs.add_leaf(leaf)
        ours.add_leaf(leaves[i])
        if first_diff is None and leaves[i] != leaf:
            first_diff = i
    report["roots"]["vault_prefix"] = ours.root().hex()
    report["roots"]["target"] = theirs.root().hex()
    report["counts"]["target"] = applied
    report["counts"]["compared"] = theirs.count
    report["at"]["target_log"] = str(log)
    if first_diff is not None:
        report["differences"].append(
            {
                "what": "target record differs from the vault's",
                "where": f"{log} record {first_diff}",
                "side": "target",
            }
        )


def _summary(report: dict[str, Any]) -> str:
    counts = report["counts"]
    text = f"{counts['vault_segments']} segments, {counts['vault']} records in the vault"
    if "target" in counts:
        text += f"; {counts['target']} applied in the target, {counts['compared']} compared"
    if report["ok"]:
        return text + ": every segment authentic, Merkle roots and continuity match"
    return text + f": {len(report['differences'])} problem(s), first: {report['differences'][0]}"
