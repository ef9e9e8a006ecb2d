"""A crash between a segment's PUT and the source's acknowledgement of it.

The shipper adopts such a segment on recovery (it is durable). The objects
source must learn what it held: a key shipped in it and deleted at the source
before the restart's scan must be deleted in the mirror too (the source's
index used to miss it, so the delete was never shipped: found by the kill -9
soak with 4 segments in flight, where the window is 4 segments wide). Two
mechanisms, each enough alone: the source marks a batch's keys in its index
before handing it over, and the shipper's recovery hands the adopted
segments' records to ``ObjectsSource.adopt``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from agent.config import AgentConfig
from agent.lab import Lab
from replicators.bucket import Bucket
from replicators.keys import build_key_provider
from replicators.metrics import Metrics
from replicators.objects import records as rec
from replicators.objects.source import ObjectsSource
from replicators.progress import StreamProgress
from replicators.s3 import S3Store
from replicators.shipper import Shipper, ShipperSettings
from replicators.vault import Vault
from tests.test_objects_rig import options

pytestmark = pytest.mark.lab


class Crash(Exception):
    """Stands for a kill -9."""


class CrashingShipper(Shipper):
    """Dies once its first segment is durable: before the checkpoint or before the ack."""

    when = "checkpoint"

    def _save(self, source_time: float) -> None:
        if self.when == "checkpoint":
            raise Crash
        super()._save(source_time)


class NotAdopting(ObjectsSource):
    """As the agent's lazily opened source was: no ``adopt`` for the shipper to call."""

    adopt = None  # type: ignore[assignment]


class CrashingSource(ObjectsSource):
    async def ack(self, position: int) -> None:
        if position > 0:
            raise Crash
        await super().ack(position)


@pytest.mark.parametrize("adopting", [True, False], ids=["adopting", "not-adopting"])
@pytest.mark.parametrize("when", ["checkpoint", "ack"])
async def test_a_key_in_a_segment_durable_but_never_acknowledged_is_deleted_later(
    lab: Lab, unique: str, tmp_path: Path, cfg_a: AgentConfig, when: str, adopting: bool
) -> None:
    opts = options(lab, f"{unique}/", scan_interval=600)
    bucket = await Bucket.open(opts.source)
    peer = cfg_a.peers[0]
    store = await S3Store.open(peer.vault)
    keys = build_key_provider(peer.keys)

    def shipper(source: ObjectsSource, cls: type[Shipper] = Shipper) -> Shipper:
        return cls(
            ShipperSettings(unique, "b", 1, 8 << 20, 0.1),
            source,
            Vault(store),
            keys,
            tmp_path / "shipped.json",
            StreamProgress(unique, "objects", "source", "b"),
            Metrics(CollectorRegistry()).stream(unique, "b"),
        )

    try:
        await bucket.write("gone", b"shipped, then deleted", "text/plain", {})
        await bucket.write("kept", b"stays", "text/plain", {})
        first_cls = CrashingSource if when == "ack" else ObjectsSource
        first = first_cls(opts, await Bucket.open(opts.source), tmp_path / "src")
        dying = shipper(first, CrashingShipper)
        dying.when = when  # type: ignore[attr-defined]
        try:
            await dying.recover()
            with pytest.raises(Crash):
                await dying.sync_once(asyncio.Event())
        finally:
            await first.aclose()
        assert [r async for r in Vault(store).segments(unique)], "the segment is durable"

        await bucket.delete("gone")
        restarted = ObjectsSource if adopting else NotAdopting
        source = restarted(opts, await Bucket.open(opts.source), tmp_path / "src")
        try:
            await shipper(source).recover()
            records: list[rec.Record] = []
            stop = asyncio.Event()
            async with asyncio.timeout(30):
                while not any(isinstance(r, rec.Delete) for r in records):
                    batch = await source.next_batch(1 << 20, 0.05, stop)
                    if batch:
                        await source.ack(batch[-1].end)
                        records += [rec.decode(c.payload) for c in batch]
        finally:
            await source.aclose()
        deletes = [r.key for r in records if isinstance(r, rec.Delete)]
        assert deletes == ["gone"]
    finally:
        await keys.aclose()
        await store.aclose()
        await bucket.aclose()
