"""The S3 event webhook facing hostile input: a token beyond loopback, a bounded
queue, and event times that cannot make the RPO look older than they may be."""

from __future__ import annotations

import json
import socket
import ssl
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from pydantic import ValidationError

from replicators.objects.options import WebhookEvents
from replicators.objects.webhook import S3Webhook
from tests.tlsutil import make_ca


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _event(key: str, when: float) -> dict[str, object]:
    stamp = datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z")
    return {
        "eventName": "ObjectCreated:Put",
        "eventTime": stamp,
        "s3": {"bucket": {"name": "data"}, "object": {"key": key, "sequencer": "01"}},
    }


def test_a_webhook_beyond_loopback_needs_a_token_and_tls(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    WebhookEvents(listen="127.0.0.1:7071")
    with pytest.raises(ValidationError, match="reachable beyond this host: set token"):
        WebhookEvents(listen="0.0.0.0:7071")
    monkeypatch.setenv("HOOK_TOKEN", "t")
    with pytest.raises(ValidationError, match="set tls_cert and tls_key so that the token"):
        WebhookEvents(listen="0.0.0.0:7071", token="env:HOOK_TOKEN")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    with pytest.raises(ValidationError, match="set both tls_cert and tls_key"):
        WebhookEvents(listen="127.0.0.1:7071", tls_cert=cert)
    WebhookEvents(listen="0.0.0.0:7071", token="env:HOOK_TOKEN", tls_cert=cert, tls_key=key)


async def test_a_webhook_with_tls_serves_https_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca, cert, _ = make_ca(tmp_path)
    monkeypatch.setenv("HOOK_TOKEN", "secret-token")
    port = _free_port()
    cfg = WebhookEvents(
        listen=f"127.0.0.1:{port}", token="env:HOOK_TOKEN",
        tls_cert=cert, tls_key=cert.with_suffix(".key"),
    )  # fmt: skip
    hook = S3Webhook(cfg, "data", "p/")
    await hook.start()
    try:
        trust = ssl.create_default_context(cafile=str(ca))
        body = json.dumps({"Records": [_event("p/k", time.time())]})
        headers = {"Authorization": "Bearer secret-token"}
        async with aiohttp.ClientSession() as http:
            url = f"https://127.0.0.1:{port}/events"
            async with http.post(url, data=body, headers=headers, ssl=trust) as resp:
                assert resp.status == 204
            with pytest.raises(aiohttp.ClientError):  # the token never travels in clear
                async with http.post(f"http://127.0.0.1:{port}/events", data=body) as resp:
                    assert resp.status >= 400
                    raise aiohttp.ClientError("refused")
        assert [h.key for h in await hook.poll()] == ["k"]
    finally:
        await hook.stop()


async def test_forged_times_are_clamped_and_a_full_queue_asks_for_a_scan() -> None:
    port = _free_port()
    hook = S3Webhook(
        WebhookEvents(listen=f"127.0.0.1:{port}", max_pending=3, max_event_age=60), "data", "p/"
    )
    await hook.start()
    try:
        now = time.time()
        records = [
            _event("p/old", now - 10 * 365 * 86400),  # a forged eventTime years ago
            _event("p/future", now + 3600),  # a clock an hour ahead
            _event("p/fine", now - 5),
        ]
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/events"
            async with http.post(url, data=json.dumps({"Records": records})) as resp:
                assert resp.status == 204
            hints = {h.key: h.time for h in await hook.poll()}
            assert now - 61 <= hints["old"] <= now - 59  # at most max_event_age old
            assert now <= hints["future"] <= time.time()  # never in the future
            assert abs(hints["fine"] - (now - 5)) < 0.01
            assert not hook.lost_events()
            burst = [_event(f"p/k{i}", now) for i in range(5)]
            async with http.post(url, data=json.dumps({"Records": burst})) as resp:
                assert resp.status == 204
        assert len(await hook.poll()) == 3  # the queue's cap; the rest dropped
        assert hook.lost_events() and not hook.lost_events()  # said once: scan
    finally:
        await hook.stop()
