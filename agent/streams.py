"""Builds the stream runners a region runs, from its configuration and role.

Active region: for every stream and every peer, a ``Shipper`` from a new
source of the stream's kind to the peer's vault, sealed with the peer's key.
Passive region: for every stream, a ``Sink`` from this region's vault, opened
with this region's key, into the stream kind's target.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

from agent.config import AgentConfig
from agent.supervise import StreamTask
from replicators.keys import KeyProvider, build_key_provider
from replicators.kinds import build_background, build_source, build_target
from replicators.metrics import Metrics
from replicators.progress import StreamProgress
from replicators.shipper import Shipper, ShipperSettings
from replicators.sink import Sink, SinkSettings
from replicators.vault import Vault
from replicators.wrappers import StoreMetrics, build_store

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
    """Open every store and key provider the role needs (closed by ``stack``).
    ``epoch`` is the fencing token written into every segment shipped."""
    tasks: list[StreamTask] = []
    streams_dir = cfg.data_dir / "streams"
    if cfg.role == "active":
        for peer in cfg.peers:
            store = await build_store(peer.vault, store_metrics, f"vault-{peer.name}")
            stack.push_async_callback(store.aclose)
            vault = Vault(store)
            keys = await _keys(stack, build_key_provider(peer.keys))
            for s in cfg.streams:
                settings = ShipperSettings(
                    stream=s.name,
                    destination=peer.name,
                    epoch=epoch,
                    segment_max_bytes=int(s.segment_max_bytes),
                    segment_max_age=s.segment_max_age,
                )
                progress = StreamProgress(stream=s.name, kind=s.kind, side="source", peer=peer.name)
                state_dir = streams_dir / s.name / f"to-{peer.name}"
                shipper = Shipper(
                    settings,
                    build_source(s, cfg, peer, state_dir),
                    vault,
                    keys,
                    state_dir / "shipped.json",
                    progress,
                    metrics.stream(s.name, peer.name),
                )
                tasks.append(StreamTask(f"{s.name}->{peer.name}", shipper, progress))
        return tasks + _background(cfg)
    store = await build_store(cfg.vault, store_metrics, f"vault-{cfg.region}")
    stack.push_async_callback(store.aclose)
    vault = Vault(store)
    keys = await _keys(stack, build_key_provider(cfg.keys))
    for s in cfg.streams:
        progress = StreamProgress(stream=s.name, kind=s.kind, side="sink", peer="vault")
        sink = Sink(
            SinkSettings(stream=s.name, origin="vault"),
            vault,
            keys,
            build_target(s, cfg, streams_dir / s.name / "target"),
            progress,
            metrics.stream(s.name, "vault"),
        )
        tasks.append(StreamTask(f"vault->{s.name}", sink, progress, idle=cfg.sink_poll_interval))
    return tasks + _background(cfg)


def _background(cfg: AgentConfig) -> list[StreamTask]:
    out = []
    for s in cfg.streams:
        for job in build_background(s, cfg, cfg.role, cfg.data_dir / "streams" / s.name):
            progress = StreamProgress(stream=s.name, kind=s.kind, side="job", peer=job.name)
            out.append(StreamTask(f"{s.name}:{job.name}", job.runner, progress, idle=job.every))
    return out
