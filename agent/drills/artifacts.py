"""The restore drill of an ``artifacts`` stream: every model version into a scratch directory.

1. ``restore`` (``replicators/artifacts/restore.py``): the catalogue of the
   stream's manifests is read from the vault (every segment verified), and
   every (model, version) is materialized from its packs (every chunk checked
   against the manifest) into ``<data_dir>/drills/<id>/<stream>/``.
2. ``verify``: a Merkle tree over each directory's files (path, size, mode,
   xxh3-128 of the bytes; files sorted by path) of the scratch copy and of the
   model store (``[streams.artifacts] root``, the passive region's copy),
   compared version by version. The vault's manifest roots are recorded too.
   With ``--at``, only versions complete at the source by then are restored.
3. teardown: the scratch directory is removed.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import xxhash

from agent.config import StreamConfig
from replicators.errors import DragentError
from replicators.keys import KeyProvider
from replicators.store import ObjectStore
from replicators.vault import Vault
from verifiers.merkle import MerkleBuilder

_READ = 1 << 20


def directory_root(directory: Path) -> tuple[str, int]:
    """(Merkle root hex, file count) of a directory's files, by relative path."""
    if not directory.is_dir():
        return "", 0
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink())
    builder = MerkleBuilder()
    for path in files:
        digest = xxhash.xxh3_128()
        with open(path, "rb") as f:
            while block := f.read(_READ):
                digest.update(block)
        st = path.stat()
        rel = path.relative_to(directory).as_posix().encode()
        builder.add(rel + b"\0" + struct.pack(">QI", st.st_size, st.st_mode) + digest.digest())
    return builder.root().hex(), len(files)


async def restore_and_compare(
    stream: StreamConfig,
    store: ObjectStore,
    keys: KeyProvider,
    *,
    drill_id: str,
    at: float | None,
    result: Any,
    scratch_root: Path | None = None,
) -> None:
    """Fill ``result`` (a ``StreamResult``). Never leaves the scratch directory behind."""
    from replicators.artifacts.restore import catalogue, restore

    opts = stream.artifacts
    assert opts is not None
    result.method = "artifacts-restore"
    scratch = (scratch_root or opts.root.parent / ".dragent-drills") / drill_id / stream.name
    phase, t = "restore", time.monotonic()
    try:
        manifests = await catalogue(Vault(store), keys, stream.name)
        if at is not None:
            manifests = {k: m for k, m in manifests.items() if _sealed_before(m, at)}
        for (model, version), m in sorted(manifests.items()):
            await restore(m, Vault(store), keys, scratch / model / version)
            result.records += 1
            result.bytes += m.size
            result.roots[f"{model}/{version}@vault"] = m.root().hex()
        result.segments = len(manifests)
        result.seconds["restore"] = round(time.monotonic() - t, 6)
        phase, t = "verify", time.monotonic()
        await asyncio.to_thread(_compare, manifests, scratch, opts.root, result)
        result.seconds["verify"] = round(time.monotonic() - t, 6)
    except (DragentError, OSError, LookupError) as exc:
        result.seconds.setdefault(phase, round(time.monotonic() - t, 6))
        result.problem = f"{phase}: {exc}"
    finally:
        t = time.monotonic()
        await asyncio.to_thread(shutil.rmtree, scratch.parent, True)
        result.seconds["teardown"] = round(time.monotonic() - t, 6)


def _sealed_before(m: Any, at: float) -> bool:
    """The version was complete at the source by ``at``."""
    return float(m.source_time) <= at


def _compare(manifests: dict[tuple[str, str], Any], scratch: Path, root: Path, result: Any) -> None:
    differ = []
    for model, version in sorted(manifests):
        restored, _ = directory_root(scratch / model / version)
        served, _ = directory_root(root / model / version)
        result.tables[f"{model}/{version}"] = {"restored": restored, "source": served}
        if restored != served:
            differ.append(f"{model}/{version}")
    combined = {
        side: _combine({k: v[side] or "" for k, v in result.tables.items()})
        for side in ("restored", "source")
    }
    result.roots.update({"restored": combined["restored"], "model-store": combined["source"]})
    result.equal = not differ and bool(manifests)
    if differ:
        result.problem = "differs from the model store: " + ", ".join(differ[:5])
    elif not manifests:
        result.problem = "nothing to restore: the vault holds no artifact of this stream"


def _combine(roots: dict[str, str]) -> str:
    builder = MerkleBuilder()
    for name in sorted(roots):
        builder.add(f"{name}={roots[name]}".encode())
    return builder.root().hex()
