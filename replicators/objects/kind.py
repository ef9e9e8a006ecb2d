"""The ``objects`` stream kind: an event-driven bucket mirror with Merkle anti-entropy.

- ``source``: ``ObjectsSource`` over ``[streams.objects] source`` (filer
  events and/or the reconcile scan).
- ``target``: ``MirrorTarget`` over ``[streams.objects] mirror``.
- ``verify``: compares source and mirror (``verifiers.objects``).
- ``background``: with ``verify_interval``, the active agent verifies and
  repairs on that schedule (``AntiEntropy``); the passive agent rebuilds the mirror's
  persisted key tree in full when it has never been built, then every
  ``TREE_REBUILD_INTERVAL`` (``MirrorTreeRebuild``).

The sink keeps the mirror's key tree (``<target>/tree.sqlite``) up to date with what it
applies; a verify compares it with the source's (in the shipping index) when both are
there, reading the mirror's over the peer agent's API when it is in another region.

Buckets are opened lazily (the kind functions are synchronous).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from replicators import checkpoint, logs, partitions
from replicators.bucket import Bucket
from replicators.errors import IntegrityError
from replicators.keys import build_key_provider
from replicators.objects import handover, held
from replicators.objects.guard import GuardPolicy
from replicators.objects.mirror import MirrorTarget
from replicators.objects.options import ObjectsOptions
from replicators.objects.source import ObjectsSource
from replicators.objects.trees import MIRROR_TREE, TreeStore, update_from_records
from replicators.paths import StreamPaths
from replicators.registry import Background
from replicators.segment import SegmentHeader
from replicators.store_metrics import build_store
from replicators.stream import Applied, Change
from replicators.vault import SegmentRef, Vault

if TYPE_CHECKING:
    from replicators.settings import AgentSettings, PeerSettings, StreamSettings
    from replicators.stream import Source, Target

KIND = "objects"
log = logs.get("objects")

TREE_REBUILD_INTERVAL = 24 * 3600.0
"""How often the passive side rebuilds the mirror's key tree from a full listing (drift:
changes made to the mirror behind the stream's back). Not yet an option of the stream."""
TREE_CHECK_EVERY = 300.0
"""How often the rebuild job looks whether a rebuild is due (a tree never built is
rebuilt at the job's first run)."""


def _options(stream: StreamSettings, active_region: str, mirror_region: str) -> ObjectsOptions:
    """The stream's options for the copy from ``active_region``'s bucket to
    ``mirror_region``'s (``ObjectsOptions.between``; two regions: ``oriented``)."""
    assert stream.objects is not None  # the config validator guarantees it
    return stream.objects.between(active_region, mirror_region)


class LazySource:
    """Opens the source bucket on ``resume`` (the first call of the shipper). For one
    partition of a partitioned stream, captures the keys of that partition only."""

    KIND: ClassVar[str] = KIND

    def __init__(
        self,
        options: ObjectsOptions,
        state_dir: Path,
        part: partitions.Partition | None = None,
        peer: PeerSettings | None = None,
    ) -> None:
        self.options = options
        self.state_dir = state_dir
        self.part = part
        self.peer = peer
        self.inner: ObjectsSource | None = None

    async def _open(self) -> ObjectsSource:
        if self.inner is None:
            bucket = await Bucket.open(self.options.source)
            part = self.part
            accept = part.accept() if part is not None and part.count > 1 else None
            inner = ObjectsSource(self.options, bucket, self.state_dir, accept=accept)
            if accept is not None and part is not None and self.peer is not None:
                try:
                    await _replay(inner, self.peer, part.name)
                except BaseException:
                    await inner.aclose()
                    raise
            self.inner = inner
        return self.inner

    async def adopt(self, records: Sequence[bytes]) -> None:
        """Records of a segment durable but never acknowledged (``ObjectsSource.adopt``):
        the shipper hands them over while it recovers, before ``resume``."""
        await (await self._open()).adopt(records)

    async def resume(self, position: int) -> None:
        await (await self._open()).resume(position)

    async def next_batch(self, max_bytes: int, max_age: float, stop: asyncio.Event) -> list[Change]:
        assert self.inner is not None, "resume() first"
        return await self.inner.next_batch(max_bytes, max_age, stop)

    async def ack(self, position: int) -> None:
        if self.inner is not None:
            await self.inner.ack(position)

    def pending_since(self) -> float | None:
        return self.inner.pending_since() if self.inner else None

    def pending_counts(self) -> dict[str, int]:
        return self.inner.pending_counts() if self.inner else {"objects": 0, "bytes": 0}

    def head(self) -> tuple[int, float] | None:
        return self.inner.head() if self.inner else None

    async def aclose(self) -> None:
        if self.inner is not None:
            await self.inner.aclose()


class LazyTarget:
    """Opens the mirror bucket on ``state`` (the first call of the sink). For one of ``n``
    partitions, the mass-delete guard allows a ``1/n`` share of the stream's deletes
    (``partition_guard``)."""

    KIND: ClassVar[str] = KIND

    def __init__(self, options: ObjectsOptions, state_dir: Path, count: int = 1) -> None:
        self.options = options
        self.state_dir = state_dir
        self.count = count
        self.inner: MirrorTarget | None = None
        self.tree: TreeStore | None = None

    async def _open(self) -> MirrorTarget:
        if self.inner is None:
            bucket = await Bucket.open(self.options.mirror)
            guard = partition_guard(self.options.delete_guard.policy(), self.count)
            self.inner = MirrorTarget(bucket, self.state_dir, guard)
            self.tree = await asyncio.to_thread(self._open_tree)
        return self.inner

    def _open_tree(self) -> TreeStore | None:
        """The mirror's key tree; None (and the mirror goes on) if it cannot be opened."""
        try:
            return TreeStore(self.state_dir / MIRROR_TREE)
        except (sqlite3.Error, OSError, ValueError) as exc:
            log.warning("mirror key tree unavailable", path=str(self.state_dir), error=str(exc))
            return None

    async def state(self) -> Applied | None:
        return await (await self._open()).state()

    async def apply(self, ref: SegmentRef, header: SegmentHeader, records: Sequence[bytes]) -> None:
        """Apply to the mirror, then tell the mirror's tree what was applied (one transaction
        per segment). A tree that cannot be updated is marked untrusted (verifies fall back
        to listings until its next full rebuild); the mirror is not held up by it."""
        await (await self._open()).apply(ref, header, records)
        tree = self.tree
        if tree is None:
            return
        try:
            await asyncio.to_thread(update_from_records, tree, records)
        except (sqlite3.Error, OSError, IntegrityError) as exc:
            log.warning("mirror key tree not updated: untrusted until rebuilt", error=str(exc))
            with contextlib.suppress(sqlite3.Error, OSError):
                await asyncio.to_thread(tree.distrust)

    async def aclose(self) -> None:
        if self.inner is not None:
            await self.inner.aclose()
        if self.tree is not None:
            self.tree.close()
            self.tree = None


def partition_guard(policy: GuardPolicy, count: int) -> GuardPolicy:
    """The guard of one of ``count`` partitions: each sees about ``1/count`` of the
    stream's deletes, and counts the whole mirror's keys, so each allows ``1/count`` of
    the stream's share, count and minimum (rounded up)."""
    if count == 1:
        return policy
    return dataclasses.replace(
        policy,
        share=policy.share / count,
        count=math.ceil(policy.count / count),
        min_deletes=math.ceil(policy.min_deletes / count),
    )


def source(
    stream: StreamSettings, agent: AgentSettings, peer: PeerSettings, state_dir: Path
) -> Source:
    """Captures the stream's keys, or one partition's (``stream.name`` names the log)."""
    part = partitions.parse(stream.name)
    return LazySource(_options(stream, agent.region, peer.name), state_dir, part, peer)


async def _replay(source: ObjectsSource, peer: PeerSettings, name: str) -> None:
    """A partition's new owner learns from the partition's log what was shipped
    (``replicators.objects.handover``) before it captures anything."""
    store = await build_store(peer.vault, None, f"vault-{peer.name}", cross_region=True)
    keys = build_key_provider(peer.keys)
    try:
        await handover.replay(source.index, Vault(store), keys, name)
    finally:
        await keys.aclose()
        await store.aclose()


def target(stream: StreamSettings, agent: AgentSettings, state_dir: Path) -> Target:
    """Applies into this region's bucket: the mirror while a peer is active."""
    count = partitions.parse(stream.name).count
    return LazyTarget(_options(stream, _peer(agent), agent.region), state_dir, count)


class AntiEntropy:
    """A background job of the active agent: verify with repair every ``verify_interval``;
    the latest unsigned report is kept in ``<state_dir>/verify-latest.json``."""

    def __init__(self, stream: StreamSettings, agent: AgentSettings, state_dir: Path) -> None:
        self.stream = stream
        self.agent = agent
        self.path = state_dir / "verify-latest.json"
        self.runs = 0
        self.repairs = 0

    async def recover(self) -> None:
        pass

    async def sync_once(self, stop: asyncio.Event) -> bool:
        report = await verify(self.stream, self.agent, repair=True)
        self.runs += 1
        self.repairs += int(report["repaired"])
        await asyncio.to_thread(checkpoint.save, self.path, report)
        log.info("anti-entropy", stream=self.stream.name, summary=report["summary"])
        return False


class MirrorTreeRebuild:
    """A background job of the passive agent: rebuild the mirror's key tree in full (from a
    listing of the mirror bucket, or from ``listing()``'s pages, e.g. an S3 Inventory
    report: ``replicators.objects.inventory``) when it has never been built, then whenever
    the last rebuild is ``interval`` seconds old. Until then a verify does not trust it."""

    def __init__(
        self,
        options: ObjectsOptions,
        path: Path,
        interval: float = TREE_REBUILD_INTERVAL,
        listing: Any = None,
    ) -> None:
        self.options = options
        self.path = path
        self.interval = interval
        self.listing = listing
        self.runs = 0
        self.last: dict[str, Any] | None = None

    async def recover(self) -> None:
        pass

    def due(self, built_at: float | None, now: float) -> bool:
        return built_at is None or now - built_at >= self.interval

    async def sync_once(self, stop: asyncio.Event) -> bool:
        from verifiers.objects import rebuild_mirror_tree

        tree = await asyncio.to_thread(TreeStore, self.path)
        try:
            if not self.due(tree.built_at, time.time()):
                return False
            bucket = await Bucket.open(self.options.mirror)
            try:
                listing = self.listing() if self.listing is not None else None
                self.last = await rebuild_mirror_tree(tree, bucket, listing)
            finally:
                await bucket.aclose()
        finally:
            tree.close()
        self.runs += 1
        log.info("mirror key tree rebuilt", path=str(self.path), **self.last)
        return False


def background(
    stream: StreamSettings, agent: AgentSettings, role: str, state_dir: Path
) -> list[Background]:
    """Active: anti-entropy every ``verify_interval`` (if set). Passive: the mirror's key
    tree rebuilt on ``TREE_REBUILD_INTERVAL`` (a stream of one partition; a partitioned
    stream's trees are per partition and not rebuilt here yet)."""
    if role != "active":
        if getattr(stream, "partitions", 1) != 1:
            return []
        options = _options(stream, _peer(agent), agent.region)
        path = StreamPaths(agent.data_dir, stream.name).target / MIRROR_TREE
        job = MirrorTreeRebuild(options, path)
        return [Background("mirror-tree", job, min(TREE_CHECK_EVERY, TREE_REBUILD_INTERVAL))]
    every = _options(stream, agent.region, _peer(agent)).verify_interval
    if every <= 0:
        return []
    return [Background("anti-entropy", AntiEntropy(stream, agent, state_dir), every)]


def _peer(agent: AgentSettings) -> str:
    """The first peer: with two regions the other one (with more, a passive region's
    target does not need the active one's name, only its own bucket)."""
    return agent.peers[0].name if agent.peers else agent.region


def _pair(agent: AgentSettings) -> tuple[str, str]:
    """(active, mirror) regions of a verify run here: the active side compares with its
    first peer, a passive one with its own bucket."""
    if agent.role == "active":
        return agent.region, _peer(agent)
    return _peer(agent), agent.region


async def verify(
    stream: StreamSettings,
    agent: AgentSettings,
    *,
    deep: bool = False,
    repair: bool = False,
    mirror_tree: Path | None = None,
) -> dict[str, Any]:
    """Compare the source bucket with the mirror; the unsigned report (see verifiers.objects).
    Deletes rejected in this region (the mass-delete guard) are accepted differences;
    deletes it holds are reported and not repaired.

    From persisted key trees when both are there (``_trees``): the source's in the shipping
    index to the peer, the mirror's at ``mirror_tree`` (a path this host can read) or else
    read from the peer agent's API; from listings otherwise (the report's ``from_trees``
    and ``trees_skipped`` say which and why)."""
    from verifiers.objects import verify_buckets

    paths = StreamPaths(agent.data_dir, stream.name)
    shippers = paths.shippers()
    indexes = [d / "shipped.sqlite" for d in shippers if (d / "shipped.sqlite").exists()]
    trees = None if deep else _trees(stream, agent, paths, mirror_tree)
    return await verify_buckets(
        stream.name,
        _options(stream, *_pair(agent)),
        index_path=indexes[0] if indexes else None,
        region=agent.region,
        deep=deep,
        repair=repair,
        accepted=held.rejected(paths.target),
        held={d["key"] for d in held.read_guard(paths.target)["held"]},
        trees=trees,
    )


def _trees(
    stream: StreamSettings, agent: AgentSettings, paths: StreamPaths, mirror_tree: Path | None
) -> tuple[Path, Any] | None:
    """(source tree, mirror tree) for a verify run by the active agent of a stream of one
    partition: the source's is the shipping index of the shipper to the peer (what is
    durable in the peer's vault); the mirror's is ``mirror_tree`` if given, else the peer's,
    read over its agent's API (``agent_url``, with this agent's API token: the agents of a
    deployment share it). None when there is no such pair: the verify lists both buckets.
    The passive side's own target tree is never taken for the mirror here: on the active
    side it would be a tree of this region's bucket from before a failover."""
    from verifiers.remote_tree import RemoteTree

    if agent.role != "active" or not agent.peers or getattr(stream, "partitions", 1) != 1:
        return None
    peer = agent.peers[0]
    source = paths.to(peer.name) / "shipped.sqlite"
    if not source.exists():
        return None
    if mirror_tree is not None:
        return source, mirror_tree
    url = getattr(peer, "agent_url", None)
    if not url:
        return None
    secret = getattr(getattr(agent, "http", None), "token", None)
    token = secret.reveal() if secret is not None else None
    return source, RemoteTree(url, stream.name, token)
