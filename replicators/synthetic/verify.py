"""On-demand verification of a ``synthetic`` stream.

The vault side is read with the one walk of the log (``replicators.logread``):
every segment opened and fully checked, continuous with the one before.

``verify`` (exposed by ``replicators.synthetic.kind``) returns the unsigned report
(fields in ``verifiers/report.py``): roots and counts of the vault log and,
with ``deep``, of the target's applied log compared record by record with the
vault. Synthetic copies are not repaired: ``repair`` is refused.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from replicators.errors import IntegrityError, SourceError
from replicators.keys import KeyProvider
from replicators.logread import LogWalk
from replicators.paths import StreamPaths
from replicators.store import ObjectStore
from replicators.synthetic.records import read_applied_log
from replicators.vault import Vault, open_vault
from verifiers.merkle import MerkleBuilder, leaf_hash

if TYPE_CHECKING:
    from replicators.settings import AgentSettings, StreamSettings


def target_log(stream: StreamSettings, agent: AgentSettings) -> Path:
    """Where this region's synthetic target keeps its applied records (agent/streams.py)."""
    return StreamPaths(agent.data_dir, stream.name).target / "applied.log"


async def verify(
    stream: StreamSettings, agent: AgentSettings, *, deep: bool = False, repair: bool = False
) -> dict[str, Any]:
    """Verify ``stream`` in this region's vault (and, with ``deep``, its target).

    Returns the unsigned report; a failed check is a report with ``ok`` false,
    not an exception. Raises ``SourceError`` for ``repair`` (not supported) and
    storage/key errors when the vault cannot be read at all.
    """
    if repair:
        raise SourceError(f"stream {stream.name}: synthetic copies are not repaired")
    started = time.time()
    async with open_vault(agent.vault, agent.keys) as (log, keys):
        vault = await _vault_side(log.store, keys, stream.name, collect=deep)
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
        walk = LogWalk(Vault(store), keys, stream)
        async for ref, opened in walk.read(done=bar.update):
            side.segments += 1
            side.records += len(opened.records)
            side.bytes = walk.bytes
            side.end, side.last = int(opened.header.end), ref.key
            for record in opened.records:
                leaf = leaf_hash(record)
                tree.add_leaf(leaf)
                if side.leaves is not None:
                    side.leaves.append(leaf)
    except IntegrityError as exc:  # name the object, whatever the check named
        side.problem = str(exc)
        side.where = walk.at.key if walk.at is not None else exc.where or None
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
