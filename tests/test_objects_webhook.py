"""The S3 event webhook facing hostile input: a token beyond loopback, a bounded
queue, and event times that cannot make the RPO look older than they may be."""

from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime

import aiohttp
import pytest
from pydantic import ValidationError

from replicators.objects.options import WebhookEvents
from replicators.objects.webhook import S3Webhook


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


def test_a_webhook_beyond_loopback_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    WebhookEvents(listen="127.0.0.1:7071")
    with pytest.raises(ValidationError, match="reachable beyond this host: set token"):
        WebhookEvents(listen="0.0.0.0:7071")
    monkeypatch.setenv("HOOK_TOKEN", "t")
    WebhookEvents(listen="0.0.0.0:7071", token="env:HOOK_TOKEN")


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
