"""Builds the stream runners a region runs, from its configuration and role.

Active region: for every stream and every peer, a ``Shipper`` from a new
source of the stream's kind to the peer's vault, sealed with the peer's key.
Passive region: for every stream, a ``Sink`` from this region's vault, opened
with this region's key, into the stream kind's target.

A stream of several partitions (``replicators.partitions``) is one log per partition:
one shipper per partition and peer, one sink per partition. An agent of a group
(``agent.group``) builds only the partitions it owns, each shipped at its partition's
own epoch; the stream's background jobs run with the owner of its partition 0, the
vault scrub with the owner of the first partition of the first stream.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

from agent.config import AgentConfig, PeerConfig, StreamConfig
from agent.scrub import scrub_tasks
from agent.supervise import StreamTask
from replicators import logs
from replicators.errors import StorageError
from replicators.keys import KeyProvider, build_key_provider
from replicators.metrics import Metrics
from replicators.partitions import Partition, partitions
from replicators.paths import StreamPaths
from replicators.progress import StreamProgress
from replicators.registry import build_background, build_source, build_target
from replicators.shipper import Shipper, ShipperSettings
from replicators.sink import Sink, SinkSettings
from replicators.store import ObjectStore
from replicators.store_metrics import StoreMetrics, build_store
from replicators.vault import Vault, check_create_only

EPOCH = 1  # without a coordinator ([failover] enabled = false) the epoch is fixed


def stream_partitions(cfg: AgentConfig) -> list[Partition]:
    """Every partition of every stream, in configuration order."""
    return [p for s in cfg.streams for p in partitions(s.name, s.partitions)]


class Owned:
    """The partitions an agent runs: all of them at the region's epoch (no group), or
    those ``epochs`` names, each at its own epoch (an agent of a group)."""

    def __init__(self, epoch: int, epochs: dict[str, int] | None = None) -> None:
        self.epoch = epoch
        self.epochs = epochs

    def has(self, part: Partition) -> bool:
        return self.epochs is None or part.name in self.epochs

    def epoch_of(self, part: Partition) -> int:
        return self.epoch if self.epochs is None else self.epochs[part.name] or self.epoch

    def leads(self, cfg: AgentConfig) -> bool:
        """Runs the region-wide jobs (the scrub): owns the first partition of all."""
        parts = stream_partitions(cfg)
        return not parts or self.has(parts[0])


async def _keys(stack: AsyncExitStack, provider: KeyProvider) -> KeyProvider:
    stack.push_async_callback(provider.aclose)
    return provider


async def build_tasks(
    cfg: AgentConfig,
    metrics: Metrics,
    stack: AsyncExitStack,
    store_metrics: StoreMetrics | None = None,
    epoch: int = EPOCH,
    owned: Owned | None = None,
) -> list[StreamTask]:
    """Open every store, key provider, source and target the role needs.

    All of them are closed by ``stack``, in reverse order of opening.
    ``epoch`` is the fencing token written into every segment shipped; ``owned`` limits
    the partitions built (default: all, at ``epoch``).
    """
    owned = owned or Owned(epoch)
    if cfg.role == "active":
        tasks = []
        for peer in cfg.peers:
            tasks += await _shippers(cfg, peer, metrics, stack, store_metrics, owned)
    else:
        tasks = await _sinks(cfg, metrics, stack, store_metrics, owned)
    scrub = await scrub_tasks(cfg, stack, store_metrics) if owned.leads(cfg) else []
    return tasks + _background(cfg, owned) + scrub


async def _shippers(
    cfg: AgentConfig,
    peer: PeerConfig,
    metrics: Metrics,
    stack: AsyncExitStack,
    store_metrics: StoreMetrics | None,
    owned: Owned,
) -> list[StreamTask]:
    names = [p.name for p in stream_partitions(cfg)]
    store = await build_store(
        peer.vault, store_metrics, f"vault-{peer.name}", cross_region=True, streams=names
    )
    stack.push_async_callback(store.aclose)
    await _create_only(store, peer.name)
    vault = Vault(store)
    keys = await _keys(stack, build_key_provider(peer.keys))
    tasks = []
    for s, part in _parts(cfg, owned):
        settings = ShipperSettings(
            stream=part.name,
            destination=peer.name,
            epoch=owned.epoch_of(part),
            segment_max_bytes=int(s.segment_max_bytes),
            segment_max_age=s.segment_max_age,
            in_flight=s.in_flight,
        )
        progress = StreamProgress(stream=part.name, kind=s.kind, side="source", peer=peer.name)
        paths = StreamPaths(cfg.data_dir, part.name)
        state_dir = paths.to(peer.name)
        source = build_source(_named(s, part), cfg, peer, state_dir)
        stack.push_async_callback(source.aclose)
        shipper = Shipper(
            settings,
            source,
            vault,
            keys,
            paths.shipped(peer.name),
            progress,
            metrics.stream(part.name, peer.name),
        )
        tasks.append(StreamTask(f"{part.name}->{peer.name}", shipper, progress))
    return tasks


async def _sinks(
    cfg: AgentConfig,
    metrics: Metrics,
    stack: AsyncExitStack,
    store_metrics: StoreMetrics | None,
    owned: Owned,
) -> list[StreamTask]:
    names = [p.name for p in stream_partitions(cfg)]
    store = await build_store(cfg.vault, store_metrics, f"vault-{cfg.region}", streams=names)
    stack.push_async_callback(store.aclose)
    vault = Vault(store)
    keys = await _keys(stack, build_key_provider(cfg.keys))
    tasks = []
    for s, part in _parts(cfg, owned):
        progress = StreamProgress(stream=part.name, kind=s.kind, side="sink", peer="vault")
        target = build_target(_named(s, part), cfg, StreamPaths(cfg.data_dir, part.name).target)
        stack.push_async_callback(target.aclose)
        # a batch may overshoot by its last record (an object part, a WAL run): room for it
        cap = 4 * int(s.segment_max_bytes) + (64 << 20)
        sink = Sink(
            SinkSettings(stream=part.name, origin="vault", max_segment_bytes=cap),
            vault,
            keys,
            target,
            progress,
            metrics.stream(s.name, "vault"),
        )
        idle = cfg.sink_poll_interval
        most = max(idle, cfg.sink_idle_poll_interval)
        tasks.append(StreamTask(f"vault->{part.name}", sink, progress, idle=idle, idle_max=most))
    return tasks


async def _create_only(store: ObjectStore, peer: str) -> None:
    """Refuse to ship into a vault that ignores create-only writes (``IntegrityError``:
    the generation fails and the agent exits). A vault that cannot be reached now is not
    refused: the shippers retry it."""
    try:
        await check_create_only(store)
    except StorageError as exc:
        logs.get("streams").warning("create-only check skipped", peer=peer, error=str(exc))


def _parts(cfg: AgentConfig, owned: Owned) -> list[tuple[StreamConfig, Partition]]:
    return [(s, p) for s in cfg.streams for p in partitions(s.name, s.partitions) if owned.has(p)]


def _named(stream: StreamConfig, part: Partition) -> StreamConfig:
    """The stream's settings as its partition's kind sees them: named after its log."""
    return stream if part.count == 1 else stream.model_copy(update={"name": part.name})


def _background(cfg: AgentConfig, owned: Owned) -> list[StreamTask]:
    out = []
    for s in cfg.streams:
        if not owned.has(partitions(s.name, s.partitions)[0]):
            continue
        for job in build_background(s, cfg, cfg.role, StreamPaths(cfg.data_dir, s.name).root):
            progress = StreamProgress(stream=s.name, kind=s.kind, side="job", peer=job.name)
            out.append(StreamTask(f"{s.name}:{job.name}", job.runner, progress, idle=job.every))
    return out
