"""The scans of one bucket in a process share one listing (``replicators.objects.listing``):
a member's partitions list the bucket once per scan, not once each. Against the lab's
SeaweedFS, with 7 keys per LIST page so that 60 keys make 9 pages: every subscriber is
given every key range, a late one the ranges it missed from the next pass, a slow or
failing one ends its own scan only, and a partition's scan finds its keys, and only
them, as a listing of its own would."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from agent.lab import Lab
from replicators import partitions, s3
from replicators.bucket import Bucket
from replicators.objects import listing
from replicators.objects.listing import Done, End, Failed, Page, Subscription, shared_listing
from replicators.objects.source import ObjectsSource
from replicators.settings import S3Config
from tests.test_objects_rig import options

pytestmark = pytest.mark.asyncio(loop_scope="session")

KEYS = [f"k/{i:03d}" for i in range(60)]


@pytest_asyncio.fixture(loop_scope="session")
async def bucket(lab: Lab, unique: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Bucket]:
    monkeypatch.setattr(s3, "LIST_PAGE", 7)
    monkeypatch.setattr(listing, "AHEAD", 2)  # 9 pages: a subscriber that waits holds it up
    b = await Bucket.open(options(lab, f"{unique}/").source)
    sem = asyncio.Semaphore(16)

    async def put(key: str) -> None:
        async with sem:
            await b.write(key, b"x", "text/plain", {})

    await asyncio.gather(*(put(k) for k in KEYS))
    yield b
    await b.aclose()


async def _drain(sub: Subscription) -> tuple[list[Page | End], list[float]]:
    """Everything ``sub`` is given up to ``Done``."""
    items: list[Page | End] = []
    times: list[float] = []
    while True:
        item = await asyncio.wait_for(sub.next(), 30)
        if isinstance(item, Done):
            return items, times
        assert not isinstance(item, Failed), item.error
        items.append(item)
        times.append(item.listed_at)


def _covered(items: list[Page | End]) -> set[str]:
    """The keys the ranges given cover: each page's own keys; an end, none (it says
    nothing follows)."""
    return {s.key for item in items if isinstance(item, Page) for s in item.states}


def _ranges_cover_all(items: list[Page | End]) -> bool:
    """The pages' ranges (after, last] and the ends' (after, ∞) cover every key: the
    ranges sorted by start meet with no gap from the first key to the end."""
    spans = sorted(
        (i.after or "", i.states[-1].key if isinstance(i, Page) else "\uffff") for i in items
    )
    reach = ""
    for start, stop in spans:
        if start > reach:
            return False
        reach = max(reach, stop)
    return reach == "\uffff"


async def test_subscribers_at_once_share_one_pass(bucket: Bucket) -> None:
    shared = shared_listing(bucket.cfg)
    passes, pages = shared.passes, shared.pages
    subs = [shared.subscribe() for _ in range(8)]
    got = await asyncio.gather(*(_drain(s) for s in subs))
    for items, _ in got:
        assert _covered(items) == set(KEYS)
        assert _ranges_cover_all(items)
        assert sum(isinstance(i, End) for i in items) == 1
    assert shared.passes - passes == 1
    assert shared.pages - pages == 9  # 60 keys, 7 a page: one listing for all eight


async def test_a_late_subscriber_is_given_what_it_missed_from_the_next_pass(
    bucket: Bucket,
) -> None:
    shared = shared_listing(bucket.cfg)
    passes = shared.passes
    early = shared.subscribe()
    first = await early.next()  # the first page is out: the listing has moved on
    assert isinstance(first, Page) and first.after is None
    await asyncio.sleep(0.2)  # the next pages are read ahead meanwhile
    late = shared.subscribe()
    assert late.joined_at is not None
    (rest, _), (items, _) = await asyncio.gather(_drain(early), _drain(late))
    assert _covered([first, *rest]) == set(KEYS)
    assert _covered(items) >= set(KEYS)  # the keys it joined after came in pass two
    assert _ranges_cover_all(items)
    assert shared.passes - passes == 2
    # its second pass stopped once it had the ranges it missed, not at the end
    second = [i for i in items[items.index(next(i for i in items if isinstance(i, End))) + 1 :]]
    assert second and all(isinstance(i, Page) for i in second)
    assert second[-1].states[-1].key >= late.joined_at  # type: ignore[union-attr]


async def test_a_subscriber_that_takes_nothing_is_dropped_and_the_others_go_on(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listing, "PATIENCE", 1.0)
    shared = shared_listing(bucket.cfg)
    stuck, busy = shared.subscribe(), shared.subscribe()
    started = time.monotonic()
    items, _ = await _drain(busy)
    assert _covered(items) == set(KEYS)
    assert time.monotonic() - started < 20
    while not stuck.queue.empty():  # its pages, then its end
        last = stuck.queue.get_nowait()
    assert isinstance(last, Failed) and "took no listing page" in str(last.error)


async def test_a_closed_subscriber_does_not_hold_the_listing(bucket: Bucket) -> None:
    shared = shared_listing(bucket.cfg)
    leaving, staying = shared.subscribe(), shared.subscribe()
    assert isinstance(await leaving.next(), Page)
    leaving.close()  # a scan restarted mid-way: its pages are no longer taken
    started = time.monotonic()
    items, _ = await _drain(staying)
    assert _covered(items) == set(KEYS)
    assert time.monotonic() - started < 5  # not held up by the closed one's full queue


async def test_a_failed_listing_fails_every_scan(lab: Lab, unique: str) -> None:
    cfg = S3Config.model_validate(
        options(lab, f"{unique}/").source.model_dump() | {"bucket": "no-such-bucket-x"}
    )
    shared = shared_listing(cfg)
    subs = [shared.subscribe() for _ in range(3)]
    for sub in subs:
        item = await asyncio.wait_for(sub.next(), 30)
        assert isinstance(item, Failed)
    sub = shared.subscribe()  # the next scan starts a listing of its own
    assert isinstance(await asyncio.wait_for(sub.next(), 30), Failed)


async def test_partitions_scans_find_their_keys_with_one_listing(
    bucket: Bucket, tmp_path: Path, lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight partitions' sources in one process, as a member that owns them runs them: each
    queues exactly its own keys, and the bucket is listed once for all of them."""
    opts = options(lab, bucket.cfg.prefix, scan_interval=600)
    parts = partitions.partitions("s", 8)
    lists: list[str] = []
    call = s3.S3Store._call

    async def counted(self: s3.S3Store, key: str, op: str, **kwargs: object) -> object:
        if op == "list_objects_v2" and str(kwargs.get("Prefix", "")).startswith(opts.source.prefix):
            lists.append(op)
        return await call(self, key, op, **kwargs)

    monkeypatch.setattr(s3.S3Store, "_call", counted)
    sources = [
        ObjectsSource(opts, await Bucket.open(opts.source), tmp_path / p.name, accept=p.accept())
        for p in parts
    ]
    before = time.time()
    try:
        for src in sources:
            await src.scanner.restart()

        async def scan(src: ObjectsSource) -> None:
            while src.scanner.scans == 0:
                await src.scanner.step()

        await asyncio.wait_for(asyncio.gather(*(scan(s) for s in sources)), 60)
        found: list[str] = []
        for src, part in zip(sources, parts, strict=True):
            mine = []
            while (item := src.queue.pop()) is not None:
                mine.append(item[0])
            assert all(part.accept()(k) for k in mine)
            found += mine
            covered = src.scanner.covered
            assert covered is not None and covered <= time.time()
            assert covered >= before - 1  # the earliest LIST of its listing, not older
        assert sorted(found) == KEYS
        assert len(lists) == 9  # 60 keys, 7 a page: one listing, not eight
    finally:
        for src in sources:
            await src.aclose()


async def test_a_source_closed_mid_scan_leaves_the_listing(
    bucket: Bucket, tmp_path: Path, lab: Lab
) -> None:
    """A partition handed over mid-scan: its source closes; the others' scans go on at
    once, not after the listing's patience with a subscriber that takes nothing."""
    opts = options(lab, bucket.cfg.prefix, scan_interval=600)
    leaving, staying = [
        ObjectsSource(opts, await Bucket.open(opts.source), tmp_path / name)
        for name in ("leaving", "staying")
    ]
    try:
        for src in (leaving, staying):
            await src.scanner.restart()
        await asyncio.gather(leaving.scanner.step(), staying.scanner.step())
        await leaving.aclose()
        started = time.monotonic()
        while staying.scanner.scans == 0:
            await asyncio.wait_for(staying.scanner.step(), 10)
        assert time.monotonic() - started < 5 < listing.PATIENCE
    finally:
        await staying.aclose()
