"""What a source does with rows whose etag it does not know (a real bucket).

A row learned from the log (``index.LOGGED``: a partition taken from another agent, a
segment durable but never acknowledged) is durable in the destination: the key is read
again and skipped if its content is the logged one. A row *in doubt* (etag empty: a
batch that may not have become durable) is always shipped again.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.lab import Lab
from replicators.bucket import Bucket
from replicators.objects import records as rec
from replicators.objects.index import LOGGED, Entry, ShippedIndex
from replicators.objects.source import ObjectsSource
from tests.test_objects_rig import options

pytestmark = pytest.mark.lab


async def test_logged_rows_are_skipped_when_unchanged_and_doubtful_ones_shipped(
    lab: Lab, unique: str, tmp_path: Path
) -> None:
    opts = options(lab, f"{unique}/", scan_interval=60)
    bucket = await Bucket.open(opts.source)
    bodies = {"same": b"logged and unchanged", "doubt": b"in doubt", "other": b"changed since"}
    rows = []
    try:
        for key, body in bodies.items():
            await bucket.write(key, body, "text/plain", {"k": "v"})
            state = await bucket.head(key)
            meta = rec.meta_fingerprint(state.content_type, dict(state.metadata))
            digest = rec.content_hash(body if key != "other" else b"what the log held")
            etag = "" if key == "doubt" else LOGGED
            rows.append((key, Entry(key, etag, state.size, state.time_ns, digest, meta)))
    finally:
        await bucket.aclose()
    index = ShippedIndex(tmp_path / "src" / "shipped.sqlite")
    index.commit(rows)
    index.close()

    source = ObjectsSource(opts, await Bucket.open(opts.source), tmp_path / "src")
    try:
        await source.resume(0)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(8, stop.set)
        shipped: list[str] = []
        while not stop.is_set() and source.scanner.scans == 0:
            batch = await source.next_batch(1 << 20, 0.1, stop)
            shipped += [rec.decode(c.payload).key for c in batch]
            if batch:
                await source.ack(batch[-1].end)
        assert source.scanner.scans >= 1, "the start-up scan did not end"
        await source.ack(source._seq)  # the learned rows are written at an ack
        assert sorted(shipped) == ["doubt", "other"]
        learned = source.index.get("same")
        assert learned is not None and learned.etag not in ("", LOGGED)
    finally:
        await source.aclose()
