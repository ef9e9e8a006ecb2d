"""Reading a vault's artifacts: the manifests in a stream's log, restore, and the scrub.

The stream's segment log is the catalogue: every record is a manifest, and
the latest record of a version is the version. ``catalogue`` reads the log
(every segment verified in full); ``restore`` assembles one version into any
directory (atomically: a hidden sibling renamed into place); ``scrub`` reads
every pack the catalogue references, verifies it and re-hashes every chunk,
and reports each damaged chunk by artifact, file and chunk.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from replicators.artifacts.assemble import (
    ArtifactIntegrityError,
    Occurrence,
    assemble,
    check_chunk,
    fetch_pack,
    fsync_dir,
)
from replicators.artifacts.manifest import Manifest, Tombstone, decode_record, locate
from replicators.artifacts.packs import damaged_records
from replicators.errors import IntegrityError
from replicators.keys import KeyProvider
from replicators.logread import LogWalk
from replicators.vault import Vault


@dataclass
class Catalogue:
    """The versions a stream's log describes: live ones, and deleted ones (with when)."""

    live: dict[tuple[str, str], Manifest] = field(default_factory=dict)
    deleted: dict[tuple[str, str], tuple[Manifest, float]] = field(default_factory=dict)


async def read_catalogue(vault: Vault, keys: KeyProvider, stream: str) -> Catalogue:
    """Replay the stream's log in ``vault`` (every segment verified in full, names bound,
    continuity checked, superseded epochs left out: ``replicators.logread``).

    Raises ``IntegrityError`` on a segment or record that fails verification.
    """
    out = Catalogue()
    async for _, opened in LogWalk(vault, keys, stream).read():
        for record in opened.records:
            item = decode_record(record)
            key = (item.model, item.version)
            if isinstance(item, Tombstone):
                last = out.live.pop(key, None)
                if last is not None:
                    out.deleted[key] = (last, item.deleted_at)
            else:
                out.live[key] = item
                out.deleted.pop(key, None)
    return out


async def catalogue(
    vault: Vault, keys: KeyProvider, stream: str
) -> dict[tuple[str, str], Manifest]:
    """``{(model, version): latest manifest}`` of the live versions in the stream's log."""
    return (await read_catalogue(vault, keys, stream)).live


async def find(vault: Vault, keys: KeyProvider, stream: str, model: str, version: str) -> Manifest:
    """The latest manifest of ``model/version``, live or deleted (while its packs are kept).

    Raises ``LookupError`` naming what exists.
    """
    known = await read_catalogue(vault, keys, stream)
    m = known.live.get((model, version))
    if m is None and (model, version) in known.deleted:
        m = known.deleted[(model, version)][0]
    if m is None:
        names = ", ".join(sorted(f"{a}/{b}" for a, b in known.live)) or "none"
        raise LookupError(f"stream {stream} has no artifact {model}/{version} (it has: {names})")
    return m


async def restore(
    m: Manifest,
    vault: Vault,
    keys: KeyProvider,
    to: Path,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write the files of ``m`` into ``to`` (which must not exist or be empty).

    Assembled in a hidden sibling of ``to``, then renamed: ``to`` holds the
    whole version or nothing. Raises ``ArtifactIntegrityError`` naming the
    artifact, file and chunk when a pack or chunk fails verification.
    """
    to = await asyncio.to_thread(_empty_target, to)
    work = to.parent / f".{to.name}.dragent-{secrets.token_hex(4)}"
    try:
        await assemble(m, vault.store, keys, work, progress)
        if to.exists():
            to.rmdir()
        work.rename(to)
        await asyncio.to_thread(fsync_dir, to.parent)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, work, True)
        raise


def _empty_target(to: Path) -> Path:
    to = to.resolve()
    if to.exists() and any(to.iterdir()):
        raise FileExistsError(f"{to} is not empty")
    to.parent.mkdir(parents=True, exist_ok=True)
    return to


@dataclass
class ScrubResult:
    packs: int = 0
    chunks: int = 0
    bytes: int = 0
    damaged: list[dict[str, str]] = field(default_factory=list)


async def scrub(
    vault: Vault,
    keys: KeyProvider,
    manifests: list[Manifest],
    progress: Callable[[int], None] | None = None,
) -> ScrubResult:
    """Read and verify every pack ``manifests`` reference, re-hash every chunk.

    Never raises for damage: each damaged chunk is listed (``what``, ``where``,
    ``detail``). Raises ``KeyAccessError`` / ``Unavailable`` when it cannot read.
    """
    by_pack: dict[str, list[tuple[Manifest, Occurrence]]] = {}
    for m in manifests:
        for key, occs in locate(m).items():
            by_pack.setdefault(key, []).extend((m, o) for o in occs)
    result = ScrubResult()
    for key, uses in sorted(by_pack.items()):
        result.packs += 1
        first = uses[0][0]
        own = [o for m, o in uses if m is first]
        try:
            records = await fetch_pack(vault.store, keys, first, key, own)
        except ArtifactIntegrityError as exc:
            cause = exc.__cause__ or exc.__context__
            records_hit = _hit_records(cause, uses)
            for m, occ in uses:
                if records_hit is None or occ[3].record in records_hit:
                    result.damaged.append(_damage(m, occ, key, str(exc)))
            continue
        for m, occ in uses:
            result.chunks += 1
            try:
                result.bytes += len(check_chunk(m, occ, records, key))
            except IntegrityError as exc:
                result.damaged.append(_damage(m, occ, key, str(exc)))
        if progress is not None:
            progress(sum(len(r) for r in records))
    return result


def _hit_records(
    cause: BaseException | None, uses: list[tuple[Manifest, Occurrence]]
) -> set[int] | None:
    if not isinstance(cause, IntegrityError):
        return None
    lengths = {occ[3].record: occ[3].length for _, occ in uses}
    hit = damaged_records(cause, lengths)
    return None if not hit else set(hit)


def _damage(m: Manifest, occ: Occurrence, pack: str, detail: str) -> dict[str, str]:
    f, index, offset, ref = occ
    return {
        "what": "damaged chunk",
        "where": f"artifact {m.name} file {f.path} chunk {index} (offset {offset})",
        "chunk": ref.id.hex(),
        "pack": pack,
        "detail": detail,
    }
