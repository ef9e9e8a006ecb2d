"""An idle stream's RPO stays small, and only while its capture works.

Real ``objects`` and ``artifacts`` sources (region a's SeaweedFS bucket, a model
store directory) ship through ``agent.supervise.run_stream`` into region b's
real vault. Once synced and idle, their RPO must stay near zero (proven by the
source's ``head()``: a scan, or a drained filer subscription, that found
nothing new); once their capture breaks (a listing refused, unreachable or
hanging, a model store gone), it must grow with wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from agent.backoff import Backoff
from agent.config import AgentConfig
from agent.lab import Lab
from agent.lab.stream_rig import lab_shipper
from agent.supervise import StreamTask
from replicators.artifacts.options import ArtifactsOptions
from replicators.artifacts.source import ArtifactsSource
from replicators.bucket import Bucket, find_weed_binary
from replicators.keys import KeyProvider, build_key_provider
from replicators.objects.source import ObjectsSource
from replicators.s3 import S3Store
from replicators.shipper import Shipper
from replicators.vault import Vault
from tests.support import eventually, running
from tests.test_objects_rig import filer_address, options

pytestmark = pytest.mark.lab

IDLE_FOR = 12.0  # seconds an idle stream is watched
IDLE_RPO = 2.0  # the most RPO an idle, healthy stream may show
BROKEN_FOR = 4.0


class SwitchBucket:
    """A ``Bucket`` that forwards every call to whichever real bucket is plugged in."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bucket, name)


def rpo(task: StreamTask) -> float:
    return task.progress.rpo(time.time())


def synced(task: StreamTask, position: int) -> bool:
    durable = task.progress.marks.get("durable")
    return (
        task.state == "running"
        and durable is not None
        and durable.position >= position
        and rpo(task) < 1.0
    )


async def assert_idle_rpo_small(task: StreamTask) -> None:
    worst, end = 0.0, time.time() + IDLE_FOR
    while time.time() < end:
        worst = max(worst, rpo(task))
        assert task.state == "running", task.last_error
        await asyncio.sleep(0.2)
    assert worst < IDLE_RPO, (worst, task.progress.proven_at, time.time())


async def assert_rpo_grows(task: StreamTask, states: tuple[str, ...]) -> None:
    first_at, first = time.time(), rpo(task)
    await asyncio.sleep(BROKEN_FOR)
    now, later = time.time(), rpo(task)
    assert task.state in states, (task.state, task.last_error)
    assert later >= BROKEN_FOR, (later, task.last_error)
    assert later - first == pytest.approx(now - first_at, abs=0.5)  # grows with wall time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_asyncio.fixture(loop_scope="session")
async def vault(cfg_a: AgentConfig) -> AsyncIterator[tuple[Vault, KeyProvider]]:
    peer = cfg_a.peers[0]
    store = await S3Store.open(peer.vault)
    keys = build_key_provider(peer.keys)
    try:
        yield Vault(store), keys
    finally:
        await keys.aclose()
        await store.aclose()


def _task(shipper: Shipper) -> StreamTask:
    backoff = Backoff(base=0.2, cap=1.0)
    return StreamTask(shipper.settings.stream, shipper, shipper.progress, backoff=backoff)


# -- objects ------------------------------------------------------------------------------------


async def _objects_task(
    name: str, opts: Any, bucket: Any, vault: tuple[Vault, KeyProvider], workdir: Path
) -> StreamTask:
    source = ObjectsSource(opts, bucket, workdir / "src")
    shipper = lab_shipper(name, "objects", source, vault[0], vault[1], workdir / "shipped.json")
    return _task(shipper)


@pytest.mark.parametrize("events", ["scan", "filer"])
async def test_an_idle_objects_stream_keeps_a_small_rpo(
    lab: Lab, unique: str, tmp_path: Path, vault: tuple[Vault, KeyProvider], events: str
) -> None:
    if events == "scan":
        opts = options(lab, f"{unique}/", scan_interval=0.5)
    else:  # only the startup scan: the filer subscription proves the rest
        filer = {"filer": filer_address(lab, "a"), "weed": find_weed_binary()}
        opts = options(lab, f"{unique}/", events="filer", filer=filer, scan_interval=3600)
    bucket = await Bucket.open(opts.source)
    await bucket.write("one", b"x" * 100, "text/plain", {})
    task = await _objects_task(unique, opts, bucket, vault, tmp_path)
    try:
        async with running(task):
            await eventually(lambda: synced(task, 1), within=30)
            await assert_idle_rpo_small(task)
            # a write while idle is shipped and the RPO stays small
            await bucket.write("two", b"y" * 100, "text/plain", {})
            await eventually(lambda: synced(task, 2), within=30)
            await assert_idle_rpo_small(task)
    finally:
        await task.runner.source.aclose()  # type: ignore[attr-defined]


async def _hanging_server() -> asyncio.Server:
    """Accepts connections and never answers (a listing that hangs)."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read()
        writer.close()

    return await asyncio.start_server(hold, "127.0.0.1", 0)


async def test_an_objects_stream_that_cannot_list_shows_a_growing_rpo(
    lab: Lab, unique: str, tmp_path: Path, vault: tuple[Vault, KeyProvider]
) -> None:
    opts = options(lab, f"{unique}/", scan_interval=0.3)
    good = await Bucket.open(opts.source)
    await good.write("one", b"x" * 100, "text/plain", {})
    hanging = await _hanging_server()
    port = hanging.sockets[0].getsockname()[1]
    broken = {
        "wrong secret": opts.source.model_copy(
            update={"secret_key": opts.source.access_key, "max_attempts": 1}
        ),
        "closed port": opts.source.model_copy(
            update={"endpoint": f"http://127.0.0.1:{_free_port()}", "max_attempts": 1}
        ),
        "hanging listing": opts.source.model_copy(
            update={"endpoint": f"http://127.0.0.1:{port}", "max_attempts": 1, "read_timeout": 8}
        ),
    }
    bad = {what: await Bucket.open(cfg) for what, cfg in broken.items()}
    switch = SwitchBucket(good)  # the source closes it
    task = await _objects_task(unique, opts, switch, vault, tmp_path)
    try:
        async with running(task):
            for what, bucket in bad.items():
                await eventually(lambda: synced(task, 1), within=30)
                await asyncio.sleep(1.0)  # idle, healthy: proofs keep coming
                assert rpo(task) < IDLE_RPO, what
                switch.bucket = bucket
                # a hanging listing leaves the stream "running", stuck inside its scan; a
                # refused one has it retry (and run again until its next listing fails)
                hangs = what == "hanging listing"
                await assert_rpo_grows(task, ("running",) if hangs else ("running", "retrying"))
                assert hangs or task.progress.snapshot(time.time())["proven_at"] is not None
                switch.bucket = good  # (a hung listing times out first)
                await eventually(lambda: synced(task, 1), within=60)
    finally:
        await task.runner.source.aclose()  # type: ignore[attr-defined]
        hanging.close()
        for bucket in bad.values():
            await bucket.aclose()


# -- artifacts ----------------------------------------------------------------------------------


def _publish(root: Path, model: str, version: str, age: float = 0.0) -> None:
    directory = root / model / version
    directory.mkdir(parents=True)
    (directory / "weights.bin").write_bytes(os.urandom(64 * 1024))
    (directory / "_COMPLETE").write_bytes(b"")
    if age:
        then = time.time() - age
        for path in (*directory.iterdir(), directory):
            os.utime(path, (then, then))


def _artifacts_shipper(
    name: str, root: Path, vault: tuple[Vault, KeyProvider], workdir: Path, **kw: Any
) -> Shipper:
    opts = ArtifactsOptions(root=root, marker="_COMPLETE", scan_interval=0.2, watch=False)
    source = ArtifactsSource(name, opts, vault[0].store, vault[1], workdir / "a")
    return lab_shipper(
        name, "artifacts", source, vault[0], vault[1], workdir / "shipped.json", max_age=0.2, **kw
    )


async def test_an_idle_artifacts_stream_keeps_a_small_rpo_until_its_store_is_gone(
    unique: str, tmp_path: Path, vault: tuple[Vault, KeyProvider]
) -> None:
    root = tmp_path / "models"
    _publish(root, "m", "v1")
    task = _task(_artifacts_shipper(unique, root, vault, tmp_path))
    try:
        async with running(task):
            await eventually(lambda: synced(task, 1), within=30)
            await assert_idle_rpo_small(task)
            # the model store disappears (an unmounted volume lists as empty): no proof
            root.rename(tmp_path / "unmounted")
            await assert_rpo_grows(task, ("running",))
            (tmp_path / "unmounted").rename(root)
            await eventually(lambda: rpo(task) < 1.0, within=10)
    finally:
        await task.runner.source.aclose()  # type: ignore[attr-defined]


async def test_versions_left_for_a_later_batch_still_count_in_the_rpo(
    unique: str, tmp_path: Path, vault: tuple[Vault, KeyProvider]
) -> None:
    root = tmp_path / "models"
    _publish(root, "m", "v1", age=100.0)
    _publish(root, "m", "v2", age=50.0)
    shipper = _artifacts_shipper(unique, root, vault, tmp_path, segment_max_bytes=1)
    try:
        await shipper.recover()
        assert await shipper.sync_once(asyncio.Event())  # one manifest per batch: v1
        assert shipper.progress.marks["durable"].position == 1
        # v2 (complete 50 s ago) is not durable: the step proves nothing after it
        assert shipper.progress.rpo(time.time()) >= 49.0
        assert await shipper.sync_once(asyncio.Event())
        assert shipper.progress.rpo(time.time()) < 5.0
    finally:
        await shipper.source.aclose()
