"""Verification on demand over HTTP and from the CLI, against two running lab agents."""

from __future__ import annotations

import asyncio
import json
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from agent.config import load_config
from agent.http import preferred_type
from agent.lab import Lab
from replicators.s3 import S3Store
from replicators.vault import Vault
from tests.support import eventually
from tests.test_agent import Pair
from verifiers.report import check, load_public_key

pytestmark = pytest.mark.lab
TOKEN = "v3rify-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest_asyncio.fixture(loop_scope="session")
async def running(lab: Lab, tmp_path: Path, unique: str) -> AsyncIterator[Pair]:
    """Both agents replicating ``unique``; b's API needs a token."""
    p = Pair(lab, tmp_path, unique)
    http_cfg = tomllib.loads(lab.config_path("b").read_text())["http"]
    (tmp_path / "token").write_text(TOKEN)
    p.b = p.agent("b", http={**http_cfg, "token": f"file:{tmp_path / 'token'}"})
    try:
        await p.b.start()
        await p.a.start()
        await p.a.wait_ready()
        await eventually(lambda: _applied_past(p, 150), within=30)
        yield p
    finally:
        await p.a.stop(grace=10)
        await p.b.stop(grace=10)


async def _applied_past(p: Pair, n: int) -> bool:
    async with aiohttp.ClientSession() as http:
        try:
            async with http.get(f"{p.b.url}/status", headers=AUTH) as resp:
                if resp.status != 200:
                    return False
                status = await resp.json()
        except aiohttp.ClientError:
            return False
    mark = status["streams"][0].get("applied") if status["streams"] else None
    return bool(mark) and mark["position"] > n


async def _finished(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with asyncio.timeout(60):
        while True:
            async with http.get(url, headers=AUTH) as resp:
                if resp.status != 202:
                    assert resp.status == 200, await resp.text()
                    return dict(await resp.json())
            await asyncio.sleep(0.2)


async def test_verify_api_returns_a_signed_report_as_json_or_html(running: Pair) -> None:
    b, stream = running.b, running.stream
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{b.url}/api/v1/verify/{stream}?deep=1") as resp:
            assert resp.status == 401
        async with http.post(f"{b.url}/api/v1/verify/nope", headers=AUTH) as resp:
            assert resp.status == 404
        async with http.post(f"{b.url}/api/v1/verify/{stream}?deep=1", headers=AUTH) as resp:
            assert resp.status == 202
            started = await resp.json()
        report = await _finished(http, f"{b.url}{started['report_url']}")
        assert report["ok"] is True, report
        assert (report["kind"], report["stream"], report["region"]) == ("synthetic", stream, "b")
        assert report["counts"]["vault"] > 150 and report["counts"]["compared"] > 150
        assert report["roots"]["target"] == report["roots"]["vault_prefix"]
        signing = load_config(b.config).signing_key_path
        key = signing.with_name(signing.name + ".pub")
        check(report, load_public_key(key))  # raises unless signed by b's key

        headers = {**AUTH, "Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"}
        async with http.get(f"{b.url}{started['report_url']}", headers=headers) as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            assert "PASS" in await resp.text()
        async with http.get(f"{b.url}/api/v1/reports", headers=AUTH) as resp:
            listed = (await resp.json())["reports"]
        assert [r["id"] for r in listed] == [started["id"]]
        async with http.get(f"{b.url}/status", headers=AUTH) as resp:
            status = await resp.json()
        assert status["verifications"][stream]["ok"] is True
        assert status["alerts"] == []
        async with http.get(f"{b.url}/metrics") as resp:
            metrics = await resp.text()
        assert f'dragent_verification_ok{{stream="{stream}"}} 1.0' in metrics
        assert "dragent_verification_last_success_timestamp_seconds" in metrics
        async with http.get(f"{b.url}/") as resp:  # the page itself is open and holds no data
            assert resp.status == 200 and "dragent status" in await resp.text()
            assert stream not in await resp.text()


async def _cli_verify(config: Path, stream: str, *extra: str) -> tuple[int, dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "verify",
        stream,
        "--config",
        str(config),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    assert out, err.decode()
    return proc.returncode, json.loads(out)


async def test_cli_verify_names_a_tampered_segment(running: Pair) -> None:
    await running.a.stop()
    await running.b.stop()
    config, stream = running.b.config, running.stream
    code, report = await _cli_verify(config, stream, "--deep")
    assert code == 0 and report["ok"], report
    assert report["signature"]["alg"] == "ed25519"

    cfg = load_config(config)
    store = await S3Store.open(cfg.vault)
    try:
        refs = [ref async for ref in Vault(store).segments(stream)]
        victim = refs[len(refs) // 2]
        blob = bytearray(await store.get(victim.key))
        blob[len(blob) // 2] ^= 0x01
        await store.put(victim.key, bytes(blob))
    finally:
        await store.aclose()
    code, report = await _cli_verify(config, stream, "--format", "json")
    assert code == 1 and report["ok"] is False
    assert victim.key in report["differences"][0]["where"]
    assert report["counts"]["vault_segments"] == len(refs) // 2


def test_accept_header_picks_the_report_format() -> None:
    assert preferred_type("") == "application/json"
    assert preferred_type("text/html,application/xhtml+xml;q=0.9") == "text/html"
    assert preferred_type("application/json, text/html;q=0.5") == "application/json"
    assert preferred_type("text/markdown") == "text/markdown"
    assert preferred_type("text/html;q=0.2, text/markdown;q=0.8") == "text/markdown"


async def test_verify_jobs_refuse_unknown_streams_and_export_the_last_result(cfg_b) -> None:
    from prometheus_client import CollectorRegistry

    from agent.verifyjobs import Job, VerifyJobs, VerifyUnavailable

    jobs = VerifyJobs(lambda: cfg_b, keep=2)
    with pytest.raises(VerifyUnavailable) as refused:
        jobs.submit("no-such-stream")
    assert refused.value.status == 404
    from agent.verifyjobs import MAX_QUEUED

    queued = [jobs.submit("synthetic") for _ in range(MAX_QUEUED)]  # nobody serves them here
    with pytest.raises(VerifyUnavailable) as refused:
        jobs.submit("synthetic")
    assert refused.value.status == 429 and all(j.state == "queued" for j in queued)
    jobs = VerifyJobs(lambda: cfg_b, keep=2)
    for i, ok in enumerate((True, False, True)):
        job = Job(f"j{i}", "synthetic", "synthetic", False, 100.0 + i)
        job.state, job.finished_at = "done", 200.0 + i
        job.report = {"ok": ok, "differences": [] if ok else [{"what": "x", "where": "y"}]}
        jobs._jobs[job.id] = job
        jobs._trim()
    assert [j.id for j in jobs.jobs()] == ["j2", "j1"]  # the oldest finished job is dropped
    registry = CollectorRegistry()
    registry.register(jobs.collector)
    value = registry.get_sample_value
    assert value("dragent_verification_ok", {"stream": "synthetic"}) == 1.0
    assert value("dragent_verification_last_run_timestamp_seconds", {"stream": "synthetic"}) == 202
    assert value("dragent_verification_differences", {"stream": "synthetic"}) == 0.0
    ts = value("dragent_verification_last_success_timestamp_seconds", {"stream": "synthetic"})
    assert ts == 202.0
