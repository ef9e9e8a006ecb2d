"""Event-driven capture from the SeaweedFS filer subscription, and the scan as safety net."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest
import pytest_asyncio

from agent.config import AgentConfig
from agent.lab import Lab
from replicators.bucket import find_weed_binary
from replicators.errors import NotFound
from replicators.objects.events import Hint
from replicators.objects.tail import FilerTail
from tests.support import eventually
from tests.test_objects_rig import Rig, filer_address, options

pytestmark = pytest.mark.lab


def _events_options(lab: Lab, prefix: str, scan_interval: float) -> object:
    filer = {"filer": filer_address(lab, "a"), "weed": find_weed_binary()}
    return options(lab, prefix, events="filer", filer=filer, scan_interval=scan_interval)


@pytest_asyncio.fixture(loop_scope="session")
async def rig(
    lab: Lab, cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> AsyncIterator[Rig]:
    opts = _events_options(lab, f"{unique}/", scan_interval=3600)
    yield Rig(unique, opts, cfg_a, cfg_b, tmp_path)  # type: ignore[arg-type]


async def _present(dst: object, key: str, body: bytes | None) -> bool:
    try:
        got = await dst.read(key, "")  # type: ignore[attr-defined]
    except NotFound:
        return body is None
    return got == body


async def test_events_drive_capture_without_a_scan(rig: Rig) -> None:
    src, dst = await rig.source_bucket(), await rig.mirror_bucket()
    try:
        async with rig.running() as (shipper, _):
            await eventually(lambda: shipper.source.scanner.scans >= 1, within=30)  # type: ignore[attr-defined]
            body = os.urandom(2000)
            started = time.monotonic()
            await src.write("e/one", body, "text/plain", {})
            await eventually(lambda: _present(dst, "e/one", body), within=30)
            await src.delete("e/one")
            await eventually(lambda: _present(dst, "e/one", None), within=30)
            assert shipper.source.scanner.scans == 1  # type: ignore[attr-defined]
            assert time.monotonic() - started < 30
    finally:
        await src.aclose()
        await dst.aclose()


async def test_dropped_notifications_are_caught_by_the_scan(
    lab: Lab, cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    interval = 4.0
    opts = _events_options(lab, f"{unique}/", scan_interval=interval)
    rig = Rig(unique, opts, cfg_a, cfg_b, tmp_path)  # type: ignore[arg-type]
    src, dst = await rig.source_bucket(), await rig.mirror_bucket()
    dropped: list[Hint] = []
    original = FilerTail.poll

    async def lossy(self: FilerTail) -> list[Hint]:
        hints = await original(self)
        dropped.extend(h for h in hints if h.key.startswith("lost/"))
        return [h for h in hints if not h.key.startswith("lost/")]

    try:
        FilerTail.poll = lossy  # type: ignore[method-assign]
        async with rig.running() as (shipper, _):
            await eventually(lambda: shipper.source.scanner.scans >= 1, within=30)  # type: ignore[attr-defined]
            bodies = {f"lost/{i}": os.urandom(300) for i in range(5)}
            for key, body in bodies.items():
                await src.write(key, body, "", {})
            await eventually(lambda: len(dropped) >= 5, within=20)
            written = time.monotonic()
            for key, body in bodies.items():
                await eventually(lambda k=key, b=body: _present(dst, k, b), within=interval + 30)
            assert shipper.source.scanner.scans >= 2  # type: ignore[attr-defined]
            assert time.monotonic() - written < interval + 30
    finally:
        FilerTail.poll = original  # type: ignore[method-assign]
        await src.aclose()
        await dst.aclose()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_s3_event_notifications_on_the_webhook(
    lab: Lab,
    cfg_a: AgentConfig,
    cfg_b: AgentConfig,
    unique: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The source's webhook receives the S3 event JSON (as MinIO's webhook target sends it);
    SeaweedFS does not send it, so the test POSTs the documented message itself."""
    import aiohttp

    from tests.test_objects_units import S3_EVENT

    monkeypatch.setenv("OBJECTS_WEBHOOK_TOKEN", "t0ken")
    port = _free_port()
    hook = {"listen": f"127.0.0.1:{port}", "token": "env:OBJECTS_WEBHOOK_TOKEN"}
    opts = options(lab, f"{unique}/", events="webhook", webhook=hook, scan_interval=3600)
    rig = Rig(unique, opts, cfg_a, cfg_b, tmp_path)
    src, dst = await rig.source_bucket(), await rig.mirror_bucket()
    record = json.loads(json.dumps(S3_EVENT["Records"][0]))
    record["s3"]["object"]["key"] = quote(f"{unique}/w/été 1.txt")
    url = f"http://127.0.0.1:{port}/events"
    try:
        async with rig.running() as (shipper, _), aiohttp.ClientSession() as http:
            await eventually(lambda: shipper.source.scanner.scans >= 1, within=30)  # type: ignore[attr-defined]
            body = os.urandom(700)
            await src.write("w/été 1.txt", body, "text/plain", {})
            async with http.post(url, json={"Records": [record]}) as resp:
                assert resp.status == 401
            auth = {"Authorization": "Bearer t0ken"}
            async with http.post(url, data=b"not json", headers=auth) as resp:
                assert resp.status == 400
            async with http.post(url, json={"Records": [record]}, headers=auth) as resp:
                assert resp.status == 204
            await eventually(lambda: _present(dst, "w/été 1.txt", body), within=30)
            assert shipper.source.scanner.scans == 1  # type: ignore[attr-defined]
    finally:
        await src.aclose()
        await dst.aclose()
