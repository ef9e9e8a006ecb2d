"""The sources of one bucket and prefix in a process share one filer subscription
(``replicators.objects.tail.SharedFilerTail``): a member's partitions run one
``weed filer.meta.tail`` child (about 100 MB each), not one each. Against the lab's
filer: four partitions' sources get their own keys' events through one child; a
source that stops leaves the child to the others; the last one stops it; a source
that does not poll loses its events (and is told so) instead of holding them all."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from agent.lab import Lab
from replicators import partitions
from replicators.bucket import Bucket, find_weed_binary
from replicators.objects import tail as tails
from replicators.objects.source import ObjectsSource
from replicators.objects.tail import FilerSubscription
from tests.support import eventually
from tests.test_objects_rig import filer_address, options

pytestmark = [pytest.mark.lab, pytest.mark.asyncio(loop_scope="session")]


def _tail_children() -> int:
    """``weed filer.meta.tail`` processes of this test process."""
    n = 0
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int(proc.name) == 0:
                continue
            status = (proc / "status").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("PPid:"))
        if b"filer.meta.tail" in cmdline and ppid == os.getpid():
            n += 1
    return n


async def test_partitions_share_one_filer_child(lab: Lab, unique: str, tmp_path: Path) -> None:
    filer = {"filer": filer_address(lab, "a"), "weed": find_weed_binary()}
    opts = options(lab, f"{unique}/", events="filer", filer=filer, scan_interval=3600)
    parts = partitions.partitions("s", 4)
    sources = [
        ObjectsSource(opts, await Bucket.open(opts.source), tmp_path / p.name, accept=p.accept())
        for p in parts
    ]
    bucket = await Bucket.open(opts.source)
    keys = [f"e/{i:02d}" for i in range(40)]
    try:
        for src in sources:
            assert isinstance(src.tail, FilerSubscription)
            await src.tail.start()
        assert len({id(src.tail.shared) for src in sources}) == 1  # type: ignore[union-attr]
        await eventually(lambda: _tail_children() == 1, within=10)
        await asyncio.sleep(1.0)  # the child has connected
        for key in keys:
            await bucket.write(key, b"x", "text/plain", {})

        got: dict[str, set[str]] = {p.name: set() for p in parts}

        async def all_seen() -> bool:
            for src, p in zip(sources, parts, strict=True):
                for hint in await src.tail.poll():  # type: ignore[union-attr]
                    if p.accept()(hint.key):
                        got[p.name].add(hint.key)
            return set().union(*got.values()) >= set(keys)

        await eventually(all_seen, within=20)
        for _ in range(3):  # quiet polls: each one's drained_at moves on
            await all_seen()
            await asyncio.sleep(0.1)
        for src, p in zip(sources, parts, strict=True):
            assert got[p.name] == {k for k in keys if p.accept()(k)}
            assert src.tail.since is not None and src.tail.drained_at is not None  # type: ignore[union-attr]

        await sources[0].aclose()  # a partition handed over: the others keep the child
        assert _tail_children() == 1
        await bucket.write("e/late", b"x", "text/plain", {})

        async def late_seen() -> bool:
            for src in sources[1:]:
                if any(h.key == "e/late" for h in await src.tail.poll()):  # type: ignore[union-attr]
                    return True
            return False

        await eventually(late_seen, within=20)
    finally:
        for src in sources[1:]:
            await src.aclose()
        await bucket.aclose()
    await eventually(lambda: _tail_children() == 0, within=10)  # the last one stopped it


async def test_a_subscriber_that_does_not_poll_loses_its_events(
    lab: Lab, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tails, "MAX_PENDING", 30)
    filer = {"filer": filer_address(lab, "a"), "weed": find_weed_binary()}
    opts = options(lab, f"{unique}/", events="filer", filer=filer)
    assert opts.filer is not None
    busy = FilerSubscription(opts.filer, "data", f"{unique}/")
    idle = FilerSubscription(opts.filer, "data", f"{unique}/")
    bucket = await Bucket.open(opts.source)
    try:
        await busy.start()
        await idle.start()
        await asyncio.sleep(1.0)
        seen: set[str] = set()
        for round_ in range(3):  # 36 events: more than the 30 one may hold
            for i in range(12):
                await bucket.write(f"k{round_}-{i}", b"x", "text/plain", {})

            async def busy_saw_all(n: int = 12 * (round_ + 1)) -> bool:
                seen.update(h.key for h in await busy.poll())
                return len(seen) >= n

            await eventually(busy_saw_all, within=20)  # it polls: it loses nothing
        assert idle.lost_events()  # it did not: dropped, and told (its source scans)
        assert idle.drained_at is None
        assert len(await idle.poll()) <= 30
    finally:
        await busy.stop()
        await idle.stop()
        await bucket.aclose()
