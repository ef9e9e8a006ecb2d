"""The objects source's key filter (``accept``: a partition of the key space)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.lab import Lab
from replicators.bucket import Bucket
from replicators.objects import records as rec
from replicators.objects.queue import ChangeQueue
from replicators.objects.source import ObjectsSource
from tests.test_objects_rig import options


def test_change_queue_drops_keys_it_does_not_accept() -> None:
    q = ChangeQueue(accept=lambda key: key.startswith("a/"))
    q.add("b/1", 1.0)
    q.add("a/1", 2.0)
    q.hold("b/2")
    q.add("b/2", 3.0)
    q.release("b/2")
    assert len(q) == 1 and q.oldest() == 2.0
    assert q.pop() == ("a/1", 2.0)
    assert q.pop() is None


async def _records(source: ObjectsSource, within: float) -> list[rec.Record]:
    """Every record captured (each batch acknowledged) until a complete scan found nothing
    more, or ``within`` seconds."""
    stop = asyncio.Event()
    timer = asyncio.get_running_loop().call_later(within, stop.set)
    out: list[rec.Record] = []
    scans = source.scanner.scans
    try:
        while not stop.is_set():
            batch = await source.next_batch(1 << 20, 0.05, stop)
            if batch:
                await source.ack(batch[-1].end)
                out += [rec.decode(c.payload) for c in batch]
            elif source.scanner.scans > scans and source.pending_since() is None:
                break
            if source.scanner.scans > scans and source.pending_since() is None:
                break
    finally:
        timer.cancel()
    return out


@pytest.mark.lab
async def test_source_ignores_keys_it_does_not_accept(
    lab: Lab, unique: str, tmp_path: Path
) -> None:
    opts = options(lab, f"{unique}/", scan_interval=600)
    bucket = await Bucket.open(opts.source)
    try:
        for key in ("a/1", "a/2", "b/1", "b/2"):
            await bucket.write(key, key.encode(), "text/plain", {})
        # a source that accepts every key ships all four
        every = ObjectsSource(opts, await Bucket.open(opts.source), tmp_path / "src")
        await every.resume(0)
        try:
            got = await _records(every, 30)
            end = every._seq
        finally:
            await every.aclose()
        assert sorted(r.key for r in got) == ["a/1", "a/2", "b/1", "b/2"]
        # the same state, now limited to a/: deletes and puts of b/ make no record
        for key in ("a/1", "b/1"):
            await bucket.delete(key)
        await bucket.write("b/3", b"new", "text/plain", {})
        await bucket.write("a/3", b"new", "text/plain", {})
        part = ObjectsSource(
            opts,
            await Bucket.open(opts.source),
            tmp_path / "src",
            accept=lambda key: key.startswith("a/"),
        )
        await part.resume(end)
        try:
            part.queue.add("b/2", 1.0)  # an event names a refused key
            got = await _records(part, 30)
        finally:
            await part.aclose()
        assert sorted((type(r).__name__, r.key) for r in got) == [
            ("Delete", "a/1"),
            ("Put", "a/3"),
        ]
    finally:
        await bucket.aclose()
