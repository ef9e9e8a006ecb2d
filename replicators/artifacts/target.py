"""The passive side: materialize every shipped version in this region's model store.

``apply`` receives verified segments whose records are manifests. For each,
the version is assembled from the vault's packs into a hidden directory
``<root>/<model>/.dragent-<version>-<random>`` (every chunk checked against its
id, files fsynced) and then renamed to ``<root>/<model>/<version>``: serving
never sees a half-written version. A version already materialized with the
same root is skipped, so re-applying a segment after a crash is idempotent.
The target keeps each applied manifest under ``state_dir/manifests`` (for
verification) and its stream position in ``applied.json``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from replicators import checkpoint, logs
from replicators.artifacts.assemble import LocalChunks, MissingPack, assemble, fsync_dir
from replicators.artifacts.manifest import Manifest, Tombstone, decode, decode_record, encode
from replicators.artifacts.options import ArtifactsOptions
from replicators.artifacts.restore import catalogue
from replicators.keys import KeyProvider
from replicators.segment import SegmentHeader
from replicators.store import ObjectStore
from replicators.stream import Applied
from replicators.vault import SegmentRef, Vault

KIND = "artifacts"


class ArtifactsTarget:
    KIND: ClassVar[str] = KIND

    def __init__(
        self, options: ArtifactsOptions, store: ObjectStore, keys: KeyProvider, state_dir: Path
    ) -> None:
        self.options = options
        self.store = store
        self.keys = keys
        self.state_dir = state_dir
        self.state_path = state_dir / "applied.json"
        self.manifests_dir = state_dir / "manifests"
        self.log = logs.get("artifacts-target")
        self.stream: str | None = None
        self.fetched_bytes = 0
        """Bytes taken from packs by this process (the rest was copied from local versions)."""

    async def state(self) -> Applied | None:
        state = checkpoint.load(self.state_path)
        if state is None:
            return None
        ref = SegmentRef(epoch=state["epoch"], seq=state["seq"], stream=state["stream"])
        return Applied(ref=ref, end=int(state["end"]), source_time=float(state["source_time"]))

    async def apply(self, ref: SegmentRef, header: SegmentHeader, records: Sequence[bytes]) -> None:
        """Materialize each manifest in order, then record the segment as applied."""
        self.stream = ref.stream
        for record in records:
            item = decode_record(record)
            if isinstance(item, Tombstone):
                await self.remove(item)
            else:
                await self.materialize(item)
        state = {
            "stream": ref.stream,
            "epoch": ref.epoch,
            "seq": ref.seq,
            "end": int(header.end),
            "source_time": header.last_source_time,
        }
        await asyncio.to_thread(checkpoint.save, self.state_path, state)

    def manifest_path(self, model: str, version: str) -> Path:
        return self.manifests_dir / model / f"{version}.json"

    def applied_manifest(self, model: str, version: str) -> Manifest | None:
        path = self.manifest_path(model, version)
        return decode(path.read_bytes()) if path.exists() else None

    async def materialize(self, m: Manifest) -> None:
        """Publish ``m`` at ``<root>/<model>/<version>``; a no-op if already there."""
        final = self.options.root / m.model / m.version
        prior = self.applied_manifest(m.model, m.version)
        if prior is not None and prior.root() == m.root() and final.is_dir():
            return
        parent = final.parent
        work = parent / f".dragent-{m.version}-{secrets.token_hex(4)}"
        parent.mkdir(parents=True, exist_ok=True)
        try:
            local = await asyncio.to_thread(self._local_chunks, m.model)
            fetched = await assemble(m, self.store, self.keys, work, local=local)
            self.fetched_bytes += fetched
            await asyncio.to_thread(_publish, work, final)
        except MissingPack:
            await asyncio.to_thread(shutil.rmtree, work, True)
            if not await self._superseded(m):
                raise
            self.log.info("superseded version skipped: its packs were collected", version=m.name)
            return
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, work, True)
            raise
        path = self.manifest_path(m.model, m.version)
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_write_atomic, path, encode(m))
        self.log.info("version materialized", version=m.name, bytes=m.size, root=m.root().hex())

    def _local_chunks(self, model: str) -> LocalChunks:
        """Chunks of the versions of ``model`` already materialized here (a new version
        usually shares most of them); each is re-hashed before use."""
        out: LocalChunks = {}
        directory = self.manifests_dir / model
        if not directory.is_dir():
            return out
        for path in sorted(directory.glob("*.json")):
            m = decode(path.read_bytes())
            base = self.options.root / m.model / m.version
            for f in m.files:
                for offset, c in zip(f.offsets(), f.chunks, strict=True):
                    out.setdefault(c.id, (base / f.path, offset, c.length))
        return out

    async def remove(self, t: Tombstone) -> None:
        """Take a deleted version out of the model store (moved aside, then removed)."""
        final = self.options.root / t.model / t.version
        await asyncio.to_thread(_remove, final)
        self.manifest_path(t.model, t.version).unlink(missing_ok=True)
        self.log.info("version removed", version=t.name)

    async def _superseded(self, m: Manifest) -> bool:
        """Does the log hold a later, different manifest of the same version? (Then a lagging
        target may skip ``m``: the collector may have deleted packs only ``m`` used.)"""
        assert self.stream is not None
        latest = (await catalogue(Vault(self.store), self.keys, self.stream)).get(
            (m.model, m.version)
        )
        return latest is not None and latest.root() != m.root()

    async def aclose(self) -> None:
        pass


def _publish(work: Path, final: Path) -> None:
    """Rename ``work`` to ``final``; an existing ``final`` is moved aside first, then removed."""
    old = None
    if final.exists():
        old = final.parent / f".dragent-old-{final.name}-{secrets.token_hex(4)}"
        os.rename(final, old)
    os.rename(work, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove(final: Path) -> None:
    if not final.exists():
        return
    old = final.parent / f".dragent-old-{final.name}-{secrets.token_hex(4)}"
    os.rename(final, old)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
