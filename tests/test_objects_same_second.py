"""A rewrite within the same LastModified second that changes only the metadata.

S3 gives LastModified to the second, and the same bytes give the same ETag, so
such a rewrite lists exactly as the state before it. The source must still
ship it: at once when an event names the key, and from the scan when the
event was lost. Real SeaweedFS (region a's ``data`` bucket), the source
driven directly, positions acknowledged as if durable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from agent.lab import Lab
from replicators.bucket import Bucket
from replicators.objects import records as rec
from replicators.objects.index import ShippedIndex
from replicators.objects.source import ObjectsSource
from tests.test_objects_rig import options

pytestmark = pytest.mark.lab


@pytest_asyncio.fixture(loop_scope="session")
async def source(lab: Lab, unique: str, tmp_path: Path) -> AsyncIterator[ObjectsSource]:
    opts = options(lab, f"{unique}/", scan_interval=0.5)
    src = ObjectsSource(opts, await Bucket.open(opts.source), tmp_path / "src")
    await src.resume(0)
    try:
        yield src
    finally:
        await src.aclose()


async def _puts(source: ObjectsSource, within: float) -> list[rec.Put]:
    """Records of batches taken (and acknowledged) until one holds a put, or ``within`` s."""
    stop = asyncio.Event()
    timer = asyncio.get_running_loop().call_later(within, stop.set)
    try:
        return await _puts_until(source, stop)
    finally:
        timer.cancel()


async def _puts_until(source: ObjectsSource, stop: asyncio.Event) -> list[rec.Put]:
    while not stop.is_set():
        batch = await source.next_batch(1 << 20, 0.1, stop)
        if batch:
            await source.ack(batch[-1].end)
            puts = [r for c in batch if isinstance(r := rec.decode(c.payload), rec.Put)]
            if puts:
                return puts
    return []


async def _rewrite_in_the_same_second(source: ObjectsSource, key: str) -> None:
    """Write ``key`` (round 1), ship it, rewrite it (round 2) within the same second."""
    bucket = source.bucket
    for _ in range(10):
        await asyncio.sleep(1 - time.time() % 1 + 0.01)  # just after a second starts
        await bucket.write(key, b"", "text/plain", {"round": "1"})
        puts = await _puts(source, within=5)
        assert [p.head.metadata for p in puts] == [{"round": "1"}]
        first = (await bucket.head(key)).time_ns
        await bucket.write(key, b"", "application/json", {"round": "2"})
        if (await bucket.head(key)).time_ns == first:
            return
    pytest.fail("could not rewrite within one LastModified second in 10 tries")


async def test_an_event_for_a_metadata_only_rewrite_ships_it(source: ObjectsSource) -> None:
    await _rewrite_in_the_same_second(source, "k")
    source.queue.add("k", time.time())  # what the filer's event does
    puts = await _puts(source, within=5)
    assert [(p.head.content_type, p.head.metadata) for p in puts] == [
        ("application/json", {"round": "2"})
    ]


async def test_the_scan_catches_a_metadata_only_rewrite_whose_event_was_lost(
    source: ObjectsSource,
) -> None:
    await _rewrite_in_the_same_second(source, "k")
    puts = await _puts(source, within=10)  # no event: only the scan (every 0.5 s)
    assert [(p.head.content_type, p.head.metadata) for p in puts] == [
        ("application/json", {"round": "2"})
    ]
    assert await _puts(source, within=4) == []  # then settled: read once more, not re-shipped
    entry = source.index.get("k")
    assert entry is not None and entry.settled


def test_an_index_written_before_the_metadata_columns_opens(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "shipped.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE shipped (key TEXT PRIMARY KEY, etag TEXT, size INTEGER,"
            " time_ns INTEGER, hash TEXT) WITHOUT ROWID"
        )
        db.execute("INSERT INTO shipped VALUES ('k', 'e', 1, 5, 'h')")
    index = ShippedIndex(path)
    try:
        entry = index.get("k")
        assert entry is not None and (entry.meta, entry.checked_ns) == ("", 0)
        assert not entry.settled  # re-read once by the next scan
    finally:
        index.close()
