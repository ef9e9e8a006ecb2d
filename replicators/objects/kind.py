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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from replicators import checkpoint, logs
from replicators.bucket import Bucket
from replicators.objects import held
from replicators.objects.mirror import MirrorTarget
from replicators.objects.options import ObjectsOptions
from replicators.objects.source import ObjectsSource
from replicators.paths import StreamPaths
from replicators.registry import Background
from replicators.segment import SegmentHeader
from replicators.stream import Applied, Change
from replicators.vault import SegmentRef

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
    """Opens the source bucket on ``resume`` (the first call of the shipper)."""

    KIND: ClassVar[str] = KIND

    def __init__(self, options: ObjectsOptions, state_dir: Path) -> None:
        self.options = options
        self.state_dir = state_dir
        self.inner: ObjectsSource | None = None

    async def resume(self, position: int) -> None:
        if self.inner is None:
            bucket = await Bucket.open(self.options.source)
            self.inner = ObjectsSource(self.options, bucket, self.state_dir)
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
    """Opens the mirror bucket on ``state`` (the first call of the sink)."""

    KIND: ClassVar[str] = KIND

    def __init__(self, options: ObjectsOptions, state_dir: Path) -> None:
        self.options = options
        self.state_dir = state_dir
        self.inner: MirrorTarget | None = None

    async def _open(self) -> MirrorTarget:
        if self.inner is None:
            bucket = await Bucket.open(self.options.mirror)
            guard = self.options.delete_guard.policy()
            self.inner = MirrorTarget(bucket, self.state_dir, guard)
        return self.inner

    async def state(self) -> Applied | None:
        return await (await self._open()).state()

    async def apply(self, ref: SegmentRef, header: SegmentHeader, records: Sequence[bytes]) -> None:
        await (await self._open()).apply(ref, header, records)

    async def aclose(self) -> None:
        if self.inner is not None:
            await self.inner.aclose()


def source(
    stream: StreamSettings, agent: AgentSettings, peer: PeerSettings, state_dir: Path
) -> Source:
    return LazySource(_options(stream, agent.region), state_dir)


def target(stream: StreamSettings, agent: AgentSettings, state_dir: Path) -> Target:
    """Applies into this region's bucket: the mirror while a peer is active."""
    return LazyTarget(_options(stream, _peer(agent)), state_dir)


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
