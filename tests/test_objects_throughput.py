"""Objects throughput work: the source's key filter (``accept``: a partition of the key
space) and pipelined shipping (``segments_in_flight`` > 1) of objects streams."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.config import AgentConfig, StreamConfig, SyntheticOptions
from agent.lab import Lab
from agent.lab.stream_rig import running_pair
from replicators.bucket import Bucket
from replicators.errors import NotFound
from replicators.keys import build_key_provider
from replicators.metrics import Metrics
from replicators.objects import records as rec
from replicators.objects.mirror import MirrorTarget
from replicators.objects.options import ObjectsOptions
from replicators.objects.queue import ChangeQueue
from replicators.objects.source import ObjectsSource
from replicators.progress import StreamProgress
from replicators.s3 import S3Store
from replicators.shipper import Shipper, ShipperSettings
from replicators.synthetic import SyntheticSource
from replicators.vault import Vault
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


class _FirstPutLate:
    """A vault store whose first segment PUT lands only after the second one has (as a
    pipelining shipper's PUTs may), and late enough that a sink lists the second alone."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._second_landed = asyncio.Event()
        self.segment_puts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def put(self, key: str, data: bytes, **kwargs: Any) -> None:
        if not key.endswith(".seg"):
            return await self._store.put(key, data, **kwargs)
        self.segment_puts += 1
        n = self.segment_puts
        if n == 1:  # (a shipper that lands the first PUT before the next never sends it)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._second_landed.wait(), 3.0)
            await asyncio.sleep(1.0)
        await self._store.put(key, data, **kwargs)
        if n == 2:
            self._second_landed.set()


@pytest.mark.lab
async def test_pipelined_parts_of_a_fresh_log_reach_the_mirror_in_order(
    lab: Lab, unique: str, tmp_path: Path, cfg_a: AgentConfig, cfg_b: AgentConfig
) -> None:
    """segments_in_flight > 1 on an objects stream: the first PUT (part 0 of a large object)
    lands after the second (part 1). A sink that has applied nothing yet must not start
    with the second: that lost part 0 ("part 1 ... without its upload")."""
    opts = options(lab, f"{unique}/", scan_interval=600, part_size="5MiB")
    src = await Bucket.open(opts.source)
    mirror = await Bucket.open(opts.mirror)
    body = os.urandom(12 << 20)  # three parts, one per segment
    await src.write("big", body, "application/octet-stream", {"m": "1"})
    peer = cfg_a.peers[0]
    store = await S3Store.open(peer.vault)
    send, recv = build_key_provider(peer.keys), build_key_provider(cfg_b.keys)
    late = _FirstPutLate(store)
    source = ObjectsSource(opts, await Bucket.open(opts.source), tmp_path / "src")
    target = MirrorTarget(await Bucket.open(opts.mirror), tmp_path / "dst")
    try:
        pair = running_pair(
            unique, "objects", source, target, late, (send, recv), tmp_path,
            in_flight=4, poll=0.02,
        )  # fmt: skip
        async with pair:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if (await mirror.head("big")).size == len(body):
                        break
                except NotFound:
                    pass
                assert time.monotonic() < deadline, "the object never reached the mirror"
                await asyncio.sleep(0.1)
        assert late.segment_puts >= 3
        assert await mirror.content_hash("big") == await src.content_hash("big")
    finally:
        for closing in (source, target, send, recv, store, src, mirror):
            await closing.aclose()


def test_objects_streams_pipeline_their_puts() -> None:
    bucket = {"endpoint": "http://127.0.0.1:1", "bucket": "data"}
    opts = ObjectsOptions.model_validate({"source": bucket, "mirror": bucket})
    assert StreamConfig(name="o", kind="objects", objects=opts).in_flight == 4
    cfg = StreamConfig(name="o", kind="objects", objects=opts, segments_in_flight=8)
    assert cfg.in_flight == 8


@pytest.mark.lab
async def test_a_full_batch_is_cut_at_once_not_at_its_age(
    lab: Lab, unique: str, tmp_path: Path
) -> None:
    """The next record does not fit: the batch ends there and then (it used to idle until
    ``max_age``, at every batch of a backlog)."""
    opts = options(lab, f"{unique}/", scan_interval=600)
    bucket = await Bucket.open(opts.source)
    source = ObjectsSource(opts, await Bucket.open(opts.source), tmp_path / "src")
    try:
        for i in range(3):
            await bucket.write(f"k{i}", os.urandom(600 << 10), "", {})
        await source.resume(0)
        async with asyncio.timeout(20):  # max_age is 120 s
            batch = await source.next_batch(1 << 20, 120.0, asyncio.Event())
        assert [rec.decode(c.payload).key for c in batch] == ["k0"]
    finally:
        await source.aclose()
        await bucket.aclose()


@pytest.mark.lab
@pytest.mark.parametrize("mib", [12, 27], ids=["hashed-from-its-parts", "hash-pass"])
async def test_large_objects_are_read_in_parallel_parts_in_order(
    lab: Lab, unique: str, tmp_path: Path, mib: int
) -> None:
    """Parts are read ``PARTS_AHEAD`` at a time, yet emitted in index order, each carrying
    the content hash of the whole object (from the parts when they are all of it)."""
    opts = options(lab, f"{unique}/", scan_interval=600, part_size="5MiB")
    bucket = await Bucket.open(opts.source)
    body = os.urandom(mib << 20)
    await bucket.write("big", body, "application/x-test", {"a": "b"})
    source = ObjectsSource(opts, await Bucket.open(opts.source), tmp_path / "src")
    try:
        await source.resume(0)
        parts: list[rec.Part] = []
        async with asyncio.timeout(60):
            while not parts or not parts[-1].last:
                batch = await source.next_batch(8 << 20, 0.05, asyncio.Event())
                if batch:
                    await source.ack(batch[-1].end)
                    parts += [r for c in batch if isinstance(r := rec.decode(c.payload), rec.Part)]
        assert [p.index for p in parts] == list(range(-(-len(body) // (5 << 20))))
        assert b"".join(p.body for p in parts) == body
        assert {p.head.content_hash for p in parts} == {rec.content_hash(body)}
        assert parts[0].head.content_type == "application/x-test"
    finally:
        await source.aclose()
        await bucket.aclose()


class _Watched:
    """A vault store noting when each segment PUT starts and ends."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.events: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def put(self, key: str, data: bytes, **kwargs: Any) -> None:
        if key.endswith(".seg"):
            self.events.append(("start", key))
            await asyncio.sleep(0.05)  # time for a pipelining shipper to start the next
        await self._store.put(key, data, **kwargs)
        if key.endswith(".seg"):
            self.events.append(("end", key))


@pytest.mark.lab
async def test_the_first_segment_of_a_log_and_of_an_epoch_lands_alone(
    unique: str, tmp_path: Path, cfg_a: AgentConfig, cfg_b: AgentConfig
) -> None:
    """A pipelining shipper sends its log's first segment, and its epoch's first after a
    takeover, alone: a sink starts at the first segment it lists and waits for a missing
    one only within its epoch, so seq n + 1 must never land while seq n is in flight."""
    peer = cfg_a.peers[0]
    store = await S3Store.open(peer.vault)
    send = build_key_provider(peer.keys)
    watched = _Watched(store)
    try:
        for epoch in (1, 2):
            shipper = Shipper(
                ShipperSettings(unique, "b", epoch, 1 << 20, 0.02, in_flight=4),
                SyntheticSource(SyntheticOptions(rate=2000.0, record_size=256)),
                Vault(watched),
                send,
                tmp_path / "shipped.json",
                StreamProgress(unique, "synthetic", "source", "b"),
                Metrics(CollectorRegistry()).stream(unique, "b"),
            )
            await shipper.recover()
            stop = asyncio.Event()
            for _ in range(6):
                await shipper.sync_once(stop)
            stop.set()
            while await shipper.sync_once(stop):
                pass
        starts = [k for what, k in watched.events if what == "start"]
        epoch_two = [k for k in starts if "/0000000002/" in k]
        assert len(epoch_two) >= 2
        for first in (starts[0], epoch_two[0]):
            began = watched.events.index(("start", first))
            ended = watched.events.index(("end", first))
            during = [k for what, k in watched.events[began + 1 : ended] if what == "start"]
            assert not during, f"{during} started while {first} was in flight"
        assert any(  # and later segments do fly together
            what == "start" and watched.events[i + 1][0] == "start"
            for i, (what, _) in enumerate(watched.events[:-1])
        )
    finally:
        await send.aclose()
        await store.aclose()
