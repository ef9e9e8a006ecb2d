"""The ``artifacts`` stream kind: model checkpoints, content-defined chunks, packs, manifests.

docs/artifacts.md describes the design. The active side (``source``) ships
the chunks a destination lacks in packs and then each version's manifest
through the stream; the passive side (``target``) materializes the model
store from the manifests and the packs in its own vault; ``verify`` compares
manifest roots (and, deep, re-reads and re-hashes every chunk).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from replicators.artifacts import layout, open_model_store
from replicators.artifacts.chunker import Chunker
from replicators.artifacts.gc import Collector
from replicators.artifacts.index import SourceIndex
from replicators.artifacts.manifest import ChunkRef, FileEntry, Manifest, decode
from replicators.artifacts.modelstore import ModelStore
from replicators.artifacts.options import ArtifactsOptions
from replicators.artifacts.packs import open_pack_store
from replicators.artifacts.restore import catalogue, scrub
from replicators.artifacts.source import ArtifactsSource
from replicators.artifacts.target import ArtifactsTarget
from replicators.artifacts.tree import TreeStore
from replicators.keys import KeyProvider, build_key_provider
from replicators.paths import StreamPaths
from replicators.registry import Background
from replicators.s3 import S3Store
from replicators.vault import Vault, open_vault

if TYPE_CHECKING:
    from replicators.settings import AgentSettings, PeerSettings, StreamSettings
    from replicators.stream import Source, Target

KIND = "artifacts"


def _options(stream: StreamSettings) -> ArtifactsOptions:
    assert stream.artifacts is not None  # StreamSettings requires the table for this kind
    return stream.artifacts


class _SourceWithStore(ArtifactsSource):
    """Opens the destination's store on ``resume`` and closes it with the source."""

    def __init__(self, stream: StreamSettings, peer: PeerSettings, state_dir: Path) -> None:
        self._peer = peer
        self._stack = AsyncExitStack()
        keys = build_key_provider(peer.keys)
        super().__init__(stream.name, _options(stream), _Unopened(), keys, state_dir)

    async def resume(self, position: int) -> None:
        if isinstance(self.store, _Unopened):
            self.store = await open_pack_store(self._peer.vault)
            self._stack.push_async_callback(self.store.aclose)
            self._stack.push_async_callback(self.keys.aclose)
        await super().resume(position)

    async def aclose(self) -> None:
        await super().aclose()
        await self._stack.aclose()


class _TargetWithStore(ArtifactsTarget):
    def __init__(self, stream: StreamSettings, agent: AgentSettings, state_dir: Path) -> None:
        self._agent = agent
        self._stack = AsyncExitStack()
        super().__init__(_options(stream), _Unopened(), build_key_provider(agent.keys), state_dir)

    async def state(self) -> Any:
        if isinstance(self.store, _Unopened):
            self.store = await S3Store.open(self._agent.vault)
            self._stack.push_async_callback(self.store.aclose)
            self._stack.push_async_callback(self.keys.aclose)
        return await super().state()

    async def aclose(self) -> None:
        await self._stack.aclose()


class _Unopened:
    """Stands for a store until it is opened; any use is a bug."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("the artifacts store is used before it was opened")


def source(
    stream: StreamSettings, agent: AgentSettings, peer: PeerSettings, state_dir: Path
) -> Source:
    return _SourceWithStore(stream, peer, state_dir)


def target(stream: StreamSettings, agent: AgentSettings, state_dir: Path) -> Target:
    return _TargetWithStore(stream, agent, state_dir)


def background(
    stream: StreamSettings, agent: AgentSettings, role: str, state_dir: Path
) -> list[Background]:
    """The active side collects unreferenced packs in every peer's vault (``gc.py``)."""
    if role != "active":
        return []
    options = _options(stream)
    return [
        Background(
            name=f"gc-{peer.name}",
            runner=Collector(
                stream.name,
                peer,
                state_dir / f"to-{peer.name}",
                options.gc_grace,
                options.retention,
            ),
            every=options.gc_interval,
        )
        for peer in agent.peers
    ]


# -- verification ------------------------------------------------------------------------------


def local_manifest(store: ModelStore, v: layout.VersionInfo, chunker: Chunker) -> Manifest:
    """The manifest of a version as it is stored now (every file re-read and re-hashed).
    Synchronous: call it in a worker thread."""
    files = []
    for f in v.files:
        reader = store.reader(v, f)
        try:
            refs = tuple(ChunkRef(p.id, p.length, 0, 0) for p in chunker.cut_stream(reader))
        finally:
            reader.close()
        files.append(FileEntry(f.path, sum(r.length for r in refs), f.mode, refs))
    return Manifest(v.model, v.version, tuple(files), ("",), chunker.params, time.time(), v.newest)


def _store_name(options: ArtifactsOptions, active: bool) -> str:
    if active and options.s3 is not None:
        return f"s3://{options.s3.bucket}/{options.s3.prefix}"
    return str(options.root)


def _chunker(options: ArtifactsOptions) -> Chunker:
    return Chunker(int(options.chunk_min), int(options.chunk_avg), int(options.chunk_max))


Recorded = Callable[[layout.VersionInfo], "str | None"]


async def _local_roots(
    options: ArtifactsOptions, complete_only: bool, recorded: Recorded | None
) -> tuple[dict[str, str], int]:
    """``{model/version: root hex}`` of the versions in this region's model store, and how
    many were re-read. ``recorded(v)`` gives a root already known for ``v`` as it is on disk
    now (None: re-read and re-hash the version's files)."""
    chunker = _chunker(options)
    now = time.time()
    out, reread = {}, 0
    # the active side's store is the one its source reads; the passive side's, the tree
    # its target materializes
    store = await open_model_store(options) if complete_only else TreeStore(options.root)
    try:
        for v in await store.scan():
            if complete_only and not layout.complete(v, now, options.marker, options.quiet_period):
                continue
            root = recorded(v) if recorded is not None else None
            if root is None:
                m = await asyncio.to_thread(local_manifest, store, v, chunker)
                root, reread = m.root().hex(), reread + 1
            out[v.name] = root
    finally:
        await store.aclose()
    return out, reread


def _recorded_by_source(index_path: Path) -> Recorded:
    """Roots the source recorded when it shipped, valid while the version's fingerprint
    (paths, sizes, modes, mtimes) is unchanged."""
    shipped = {}
    if index_path.exists():
        index = SourceIndex(index_path)
        try:
            shipped = index.shipped()
        finally:
            index.close()

    def lookup(v: layout.VersionInfo) -> str | None:
        fp, root = shipped.get(v.key, ("", ""))
        return root if root and fp == v.fingerprint() else None

    return lookup


def _recorded_by_target(manifests_dir: Path) -> Recorded:
    """Roots of the manifests the target materialized, valid while the files on disk have
    the paths, sizes and modes the manifest lists."""

    def lookup(v: layout.VersionInfo) -> str | None:
        path = manifests_dir / v.model / f"{v.version}.json"
        if not path.exists():
            return None
        m = decode(path.read_bytes())
        listed = sorted((f.path, f.size, f.mode & 0o7777) for f in m.files)
        if listed != sorted((f.path, f.size, f.mode) for f in v.files):
            return None
        return m.root().hex()

    return lookup


def _differences(
    ours: dict[str, str], theirs: dict[str, str], a: str, b: str
) -> list[dict[str, str]]:
    out = []
    for name in sorted(set(ours) | set(theirs)):
        x, y = ours.get(name), theirs.get(name)
        if x == y:
            continue
        if y is None:
            out.append({"what": f"missing in {b}", "where": name, a: x or ""})
        elif x is None:
            out.append({"what": f"missing in {a}", "where": name, b: y})
        else:
            out.append({"what": "root mismatch", "where": name, a: x, b: y})
    return out


def _combined(roots: dict[str, str]) -> str:
    from verifiers.merkle import leaf_hash, merkle_root

    leaves = [leaf_hash(f"{k}\0{v}".encode()) for k, v in sorted(roots.items())]
    return merkle_root(leaves).hex()


async def _vault_side(
    vault: Vault, keys: KeyProvider, stream: str, deep: bool
) -> tuple[dict[str, str], list[dict[str, str]], dict[str, int]]:
    manifests = await catalogue(vault, keys, stream)
    roots = {m.name: m.root().hex() for m in manifests.values()}
    if not deep:
        return roots, [], {}
    result = await scrub(vault, keys, list(manifests.values()))
    stats = {
        "packs_read": result.packs,
        "chunks_hashed": result.chunks,
        "bytes_hashed": result.bytes,
    }
    return roots, result.damaged, stats


async def verify(
    stream: StreamSettings, agent: AgentSettings, *, deep: bool = False, repair: bool = False
) -> dict[str, Any]:
    """Compare manifest roots: this region's model store against the vault's manifests.

    Active region: the local store (complete versions) against each peer's
    vault. Passive region: its own vault against the materialized store.
    A local version's root is the one recorded when it was shipped (active)
    or materialized (passive) while its files look unchanged (paths, sizes,
    modes, and on the active side mtimes); otherwise its files are re-read
    and re-hashed. ``deep`` re-reads and re-hashes every local file, and
    reads every pack the vault's manifests reference, verifies it and
    re-hashes every chunk (the scrub). ``repair`` is not supported: a
    difference is repaired by the stream itself (re-shipping a changed
    version) and reported here.
    """
    options = _options(stream)
    started = time.time()
    active = agent.role == "active"
    paths = StreamPaths(agent.data_dir, stream.name)
    where = (
        [(p.name, p.vault, p.keys) for p in agent.peers]
        if active
        else [("vault", agent.vault, agent.keys)]
    )
    differences: list[dict[str, str]] = []
    stats: dict[str, int] = {"versions_reread": 0}
    roots: dict[str, str] = {}
    counts: dict[str, int] = {}
    local: dict[str, str] = {}
    for name, vault_cfg, keys_cfg in where:
        recorded: Recorded | None = None
        if not deep and active:
            recorded = _recorded_by_source(paths.to(name) / "source.db")
        elif not deep:
            recorded = _recorded_by_target(paths.target / "manifests")
        local, reread = await _local_roots(options, active, recorded)
        stats["versions_reread"] += reread
        roots[agent.region], counts[agent.region] = _combined(local), len(local)
        async with open_vault(vault_cfg, keys_cfg) as (vault, keys):
            theirs, damaged, more = await _vault_side(vault, keys, stream.name, deep)
        roots[name], counts[name] = _combined(theirs), len(theirs)
        differences += _differences(local, theirs, agent.region, name) + damaged
        stats.update({k: stats.get(k, 0) + v for k, v in more.items()})
    ok = not differences
    summary = (
        f"{len(local)} versions match" + (" and every chunk re-hashed" if deep else "")
        if ok
        else f"{len(differences)} differences"
    )
    return {
        "kind": KIND,
        "stream": stream.name,
        "region": agent.region,
        "started_at": started,
        "finished_at": time.time(),
        "at": f"model store {_store_name(options, active)} and the stream's manifests at "
        f"{time.time():.0f}",
        "ok": ok,
        "deep": deep,
        "repair": "not supported: the stream re-ships changed versions" if repair else None,
        "summary": summary,
        "roots": roots,
        "counts": counts,
        "versions": {"local": local},
        "stats": stats,
        "differences": differences,
    }
