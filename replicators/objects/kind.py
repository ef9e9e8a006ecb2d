"""The ``objects`` stream kind: an event-driven bucket mirror with Merkle anti-entropy.

- ``source``: ``ObjectsSource`` over ``[streams.objects] source`` (filer
  events and/or the reconcile scan).
- ``target``: ``MirrorTarget`` over ``[streams.objects] mirror``.
- ``verify``: compares source and mirror (``verifiers.objects``).
- ``background``: with ``verify_interval``, the active agent verifies and
  repairs on that schedule (``AntiEntropy``).

Buckets are opened lazily (the kind functions are synchronous).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from replicators import checkpoint, logs, partitions
from replicators.bucket import Bucket
from replicators.keys import build_key_provider
from replicators.objects import handover, held
from replicators.objects.guard import GuardPolicy
from replicators.objects.mirror import MirrorTarget
from replicators.objects.options import ObjectsOptions
from replicators.objects.source import ObjectsSource
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


def _options(stream: StreamSettings, active_region: str) -> ObjectsOptions:
    """The stream's options oriented for ``active_region`` (see ``ObjectsOptions.oriented``)."""
    assert stream.objects is not None  # the config validator guarantees it
    return stream.objects.oriented(active_region)


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

    async def resume(self, position: int) -> None:
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
        await self.inner.resume(position)

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

    async def _open(self) -> MirrorTarget:
        if self.inner is None:
            bucket = await Bucket.open(self.options.mirror)
            guard = partition_guard(self.options.delete_guard.policy(), self.count)
            self.inner = MirrorTarget(bucket, self.state_dir, guard)
        return self.inner

    async def state(self) -> Applied | None:
        return await (await self._open()).state()

    async def apply(self, ref: SegmentRef, header: SegmentHeader, records: Sequence[bytes]) -> None:
        await (await self._open()).apply(ref, header, records)

    async def aclose(self) -> None:
        if self.inner is not None:
            await self.inner.aclose()


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
    return LazySource(_options(stream, agent.region), state_dir, part, peer)


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
    return LazyTarget(_options(stream, _peer(agent)), state_dir, count)


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


def background(
    stream: StreamSettings, agent: AgentSettings, role: str, state_dir: Path
) -> list[Background]:
    every = _options(stream, agent.region).verify_interval
    if role != "active" or every <= 0:
        return []
    return [Background("anti-entropy", AntiEntropy(stream, agent, state_dir), every)]


def _peer(agent: AgentSettings) -> str:
    return agent.peers[0].name if agent.peers else agent.region


async def verify(
    stream: StreamSettings, agent: AgentSettings, *, deep: bool = False, repair: bool = False
) -> dict[str, Any]:
    """Compare the source bucket with the mirror; the unsigned report (see verifiers.objects).
    Deletes rejected in this region (the mass-delete guard) are accepted differences;
    deletes it holds are reported and not repaired."""
    from verifiers.objects import verify_buckets

    paths = StreamPaths(agent.data_dir, stream.name)
    shippers = paths.shippers()
    indexes = [d / "shipped.sqlite" for d in shippers if (d / "shipped.sqlite").exists()]
    return await verify_buckets(
        stream.name,
        _options(stream, agent.region if agent.role == "active" else _peer(agent)),
        index_path=indexes[0] if indexes else None,
        region=agent.region,
        deep=deep,
        repair=repair,
        accepted=held.rejected(paths.target),
        held={d["key"] for d in held.read_guard(paths.target)["held"]},
    )
