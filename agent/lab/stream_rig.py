"""One stream's shipper and sink in one process, over one vault.

``lab_shipper`` and ``lab_sink`` build them as a two-region lab names them
(shipped by "a" to "b", epoch 1); ``running_pair`` is what tests and
benchmarks run to watch a stream end to end without two
agents: the shipper seals the source's changes into ``store`` for peer "b",
the sink applies them from there into the target, each looping until the
block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client import CollectorRegistry

from replicators.keys import KeyProvider
from replicators.metrics import Metrics
from replicators.progress import StreamProgress
from replicators.shipper import Shipper, ShipperSettings
from replicators.sink import Sink, SinkSettings
from replicators.store import ObjectStore
from replicators.stream import Source, Target
from replicators.vault import Vault


def lab_shipper(
    name: str,
    kind: str,
    source: Source,
    vault: Vault,
    keys: KeyProvider,
    state_file: Path,
    metrics: Metrics | None = None,
    *,
    segment_max_bytes: int = 8 << 20,
    max_age: float = 0.1,
    in_flight: int = 1,
) -> Shipper:
    """A shipper of ``name`` to peer "b" at epoch 1, its position in ``state_file``."""
    metrics = metrics or Metrics(CollectorRegistry())
    return Shipper(
        ShipperSettings(name, "b", 1, segment_max_bytes, max_age, in_flight),
        source,
        vault,
        keys,
        state_file,
        StreamProgress(name, kind, "source", "b"),
        metrics.stream(name, "b"),
    )


def lab_sink(
    name: str,
    kind: str,
    target: Target,
    vault: Vault,
    keys: KeyProvider,
    metrics: Metrics | None = None,
) -> Sink:
    """A sink of ``name`` (shipped by "a") from ``vault`` into ``target``."""
    metrics = metrics or Metrics(CollectorRegistry())
    return Sink(
        SinkSettings(name, "a"),
        vault,
        keys,
        target,
        StreamProgress(name, kind, "sink", "vault"),
        metrics.stream(name, "vault"),
    )


@contextlib.asynccontextmanager
async def running_pair(
    name: str,
    kind: str,
    source: Source,
    target: Target,
    store: ObjectStore,
    keys: tuple[KeyProvider, KeyProvider],
    state_dir: Path,
    *,
    metrics: Metrics | None = None,
    segment_max_bytes: int = 8 << 20,
    max_age: float = 0.1,
    poll: float = 0.05,
    in_flight: int = 1,
) -> AsyncIterator[tuple[Shipper, Sink]]:
    """Ship and apply until the block ends; ``keys`` = (sealing, opening) providers."""
    metrics = metrics or Metrics(CollectorRegistry())
    vault = Vault(store)
    shipper = lab_shipper(
        name, kind, source, vault, keys[0], state_dir / "shipped.json", metrics,
        segment_max_bytes=segment_max_bytes, max_age=max_age, in_flight=in_flight,
    )  # fmt: skip
    sink = lab_sink(name, kind, target, vault, keys[1], metrics)
    await shipper.recover()
    await sink.recover()
    stop = asyncio.Event()

    async def ship() -> None:
        while not stop.is_set():
            await shipper.sync_once(stop)

    async def apply() -> None:
        while not stop.is_set():
            if not await sink.sync_once(stop):
                await asyncio.sleep(poll)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(ship())
        tg.create_task(apply())
        try:
            yield shipper, sink
        finally:
            stop.set()
