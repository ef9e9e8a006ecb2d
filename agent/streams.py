"""Builds the stream runners a region runs, from its configuration and role.

Active region: for every stream and every peer, a ``Shipper`` from a new
source of the stream's kind to the peer's vault, sealed with the peer's key.
Passive region: for every stream, a ``Sink`` from this region's vault, opened
with this region's key, into the stream kind's target.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

from agent.config import AgentConfig, PeerConfig
from agent.scrub import scrub_tasks
from agent.supervise import StreamTask
from replicators import logs
from replicators.errors import StorageError
from replicators.keys import KeyProvider, build_key_provider
from replicators.metrics import Metrics
from replicators.paths import StreamPaths
from replicators.progress import StreamProgress
from replicators.registry import build_background, build_source, build_target
from replicators.shipper import Shipper, ShipperSettings
from replicators.sink import Sink, SinkSettings
from replicators.store import ObjectStore
from replicators.store_metrics import StoreMetrics, build_store
from replicators.vault import Vault, check_create_only

EPOCH = 1  # without a coordinator ([failover] enabled = false) the epoch is fixed


async def _keys(stack: AsyncExitStack, provider: KeyProvider) -> KeyProvider:
    stack.push_async_callback(provider.aclose)
    return provider


async def build_tasks(
    cfg: AgentConfig,
    metrics: Metrics,
    stack: AsyncExitStack,
    store_metrics: StoreMetrics | None = None,
    epoch: int = EPOCH,
) -> list[StreamTask]:
    """Open every store, key provider, source and target the role needs.

    All of them are closed by ``stack``, in reverse order of opening.
    ``epoch`` is the fencing token written into every segment shipped.
    """
    if cfg.role == "active":
        tasks = []
        for peer in cfg.peers:
            tasks += await _shippers(cfg, peer, metrics, stack, store_metrics, epoch)
    else:
        tasks = await _sinks(cfg, metrics, stack, store_metrics)
    return tasks + _background(cfg) + await scrub_tasks(cfg, stack, store_metrics)


async def _shippers(
    cfg: AgentConfig,
    peer: PeerConfig,
    metrics: Metrics,
    stack: AsyncExitStack,
    store_metrics: StoreMetrics | None,
    epoch: int,
) -> list[StreamTask]:
    names = [s.name for s in cfg.streams]
    store = await build_store(
        peer.vault, store_metrics, f"vault-{peer.name}", cross_region=True, streams=names
    )
    stack.push_async_callback(store.aclose)
    await _create_only(store, peer.name)
    vault = Vault(store)
    keys = await _keys(stack, build_key_provider(peer.keys))
    tasks = []
    for s in cfg.streams:
        settings = ShipperSettings(
            stream=s.name,
            destination=peer.name,
            epoch=epoch,
            segment_max_bytes=int(s.segment_max_bytes),
            segment_max_age=s.segment_max_age,
            in_flight=s.in_flight,
        )
        progress = StreamProgress(stream=s.name, kind=s.kind, side="source", peer=peer.name)
        paths = StreamPaths(cfg.data_dir, s.name)
        state_dir = paths.to(peer.name)
        source = build_source(s, cfg, peer, state_dir)
        stack.push_async_callback(source.aclose)
        shipper = Shipper(
            settings,
            source,
            vault,
            keys,
            paths.shipped(peer.name),
            progress,
            metrics.stream(s.name, peer.name),
        )
        tasks.append(StreamTask(f"{s.name}->{peer.name}", shipper, progress))
    return tasks


async def _sinks(
    cfg: AgentConfig,
    metrics: Metrics,
    stack: AsyncExitStack,
    store_metrics: StoreMetrics | None,
) -> list[StreamTask]:
    names = [s.name for s in cfg.streams]
    store = await build_store(cfg.vault, store_metrics, f"vault-{cfg.region}", streams=names)
    stack.push_async_callback(store.aclose)
    vault = Vault(store)
    keys = await _keys(stack, build_key_provider(cfg.keys))
    tasks = []
    for s in cfg.streams:
        progress = StreamProgress(stream=s.name, kind=s.kind, side="sink", peer="vault")
        target = build_target(s, cfg, StreamPaths(cfg.data_dir, s.name).target)
        stack.push_async_callback(target.aclose)
        # a batch may overshoot by its last record (an object part, a WAL run): room for it
        cap = 4 * int(s.segment_max_bytes) + (64 << 20)
        sink = Sink(
            SinkSettings(stream=s.name, origin="vault", max_segment_bytes=cap),
            vault,
            keys,
            target,
            progress,
            metrics.stream(s.name, "vault"),
        )
        idle = cfg.sink_poll_interval
        most = max(idle, cfg.sink_idle_poll_interval)
        tasks.append(StreamTask(f"vault->{s.name}", sink, progress, idle=idle, idle_max=most))
    return tasks


async def _create_only(store: ObjectStore, peer: str) -> None:
    """Refuse to ship into a vault that ignores create-only writes (``IntegrityError``:
    the generation fails and the agent exits). A vault that cannot be reached now is not
    refused: the shippers retry it."""
    try:
        await check_create_only(store)
    except StorageError as exc:
        logs.get("streams").warning("create-only check skipped", peer=peer, error=str(exc))


def _background(cfg: AgentConfig) -> list[StreamTask]:
    out = []
    for s in cfg.streams:
        for job in build_background(s, cfg, cfg.role, StreamPaths(cfg.data_dir, s.name).root):
            progress = StreamProgress(stream=s.name, kind=s.kind, side="job", peer=job.name)
            out.append(StreamTask(f"{s.name}:{job.name}", job.runner, progress, idle=job.every))
    return out
