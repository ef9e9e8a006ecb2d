"""S3 event notifications read from SQS (``replicators/objects/sqs.py``), against moto's
server for SQS (the session's ``moto_server``) and, end to end, the lab's SeaweedFS for
the buckets with the shipper and sink running in-process (``tests/test_objects_rig``).

SeaweedFS does not publish S3 event notifications to SQS, so each test writes the object
and then sends the notification itself, as S3 would: the documented message shape
(``tests.test_objects_units.S3_EVENT``) as the message body. moto's SQS is real enough
for what the poller relies on: long polling, the visibility timeout (a message not
deleted comes back, its ApproximateReceiveCount one higher), receipt handles,
DeleteMessageBatch, SentTimestamp.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_asyncio
from pydantic import ValidationError

from agent.config import AgentConfig
from agent.lab import Lab
from agent.lab.moto import MotoServer
from replicators.bucket import Bucket
from replicators.errors import NotFound
from replicators.objects.options import ObjectsOptions, SqsEvents
from replicators.objects.source import ObjectsSource
from replicators.objects.sqs import SqsPoller
from replicators.vault import Vault
from tests.moto import ACCESS_KEY, SECRET_KEY, client
from tests.support import eventually
from tests.test_objects_rig import Rig, options
from tests.test_objects_units import S3_EVENT

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sqs_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQS_AK", ACCESS_KEY)
    monkeypatch.setenv("SQS_SK", SECRET_KEY)


@pytest_asyncio.fixture(loop_scope="session")
async def sqs(moto_server: MotoServer) -> AsyncIterator[Any]:
    """An SQS client on moto."""
    async with client(moto_server, "sqs") as c:
        yield c


async def _queue(sqs: Any, name: str) -> str:
    return str((await sqs.create_queue(QueueName=f"dr-{name}"[:80]))["QueueUrl"])


def _sqs_table(moto: MotoServer, url: str, **extra: Any) -> dict[str, Any]:
    table = {
        "queue_url": url,
        "endpoint": moto.endpoint,
        "access_key": "env:SQS_AK",
        "secret_key": "env:SQS_SK",
        "wait_time": 2,
        "visibility_timeout": 30,
    }
    return table | extra


def _record(key: str, when: float | None = None, bucket: str = "data") -> dict[str, Any]:
    record = copy.deepcopy(S3_EVENT["Records"][0])
    stamp = datetime.fromtimestamp(time.time() if when is None else when, UTC)
    record["eventTime"] = stamp.isoformat().replace("+00:00", "Z")
    record["s3"]["bucket"]["name"] = bucket
    record["s3"]["object"]["key"] = quote(key)
    return record


async def _notify(sqs: Any, url: str, *records: dict[str, Any]) -> None:
    """What S3 sends to the queue: one message, the notification JSON as its body."""
    await sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"Records": list(records)}))


async def _counts(sqs: Any, url: str) -> tuple[int, int]:
    """(messages waiting, messages received and not yet deleted or visible again)."""
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    got = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names))["Attributes"]
    return int(got[names[0]]), int(got[names[1]])


async def _empty(sqs: Any, url: str) -> bool:
    return await _counts(sqs, url) == (0, 0)


# --- configuration ---------------------------------------------------------------------------


def test_sqs_events_configuration(sqs_keys: None) -> None:
    bucket = {"bucket": "data"}
    url = "https://sqs.eu-west-1.amazonaws.com/123456789012/dr-events"
    with pytest.raises(ValidationError, match=r"events = 'sqs' needs a \[streams.objects.sqs\]"):
        ObjectsOptions.model_validate({"source": bucket, "mirror": bucket, "events": "sqs"})
    with pytest.raises(ValidationError, match="access_key and secret_key go together"):
        SqsEvents(queue_url=url, access_key="env:SQS_AK")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="queue_url"):
        SqsEvents(queue_url="dr-events")
    with pytest.raises(ValidationError, match="wait_time"):
        SqsEvents(queue_url=url, wait_time=21)  # SQS's longest long poll is 20 s
    opts = ObjectsOptions.model_validate(
        {
            "source": bucket,
            "mirror": bucket,
            "events": "sqs",
            "sqs": {"queue_url": url, "access_key": "env:SQS_AK", "secret_key": "env:SQS_SK"},
            "source_region": "a",
        }
    )
    assert opts.sqs is not None and opts.sqs.access_key is not None
    assert "AKIDEXAMPLE" not in repr(opts.sqs)
    # turned after a takeover: the queue carries the old source bucket's notifications only
    assert opts.oriented("b").events == "none" and opts.oriented("a").events == "sqs"


# --- the poller alone, against moto's SQS ---------------------------------------------------


async def test_poller_clamps_times_deletes_the_irrelevant_and_only_durable_changes(
    moto_server: MotoServer, sqs: Any, sqs_keys: None, unique: str
) -> None:
    url = await _queue(sqs, unique)
    cfg = SqsEvents.model_validate(_sqs_table(moto_server, url, max_event_age=60))
    poller = SqsPoller(cfg, "data", "p/")
    now = time.time()
    await _notify(
        sqs,
        url,
        _record("p/old", now - 10 * 365 * 86400),  # a forged eventTime years ago
        _record("p/future", now + 3600),  # a clock an hour ahead
        _record("p/fine", now - 5),
    )
    sns = {"Type": "Notification", "Message": json.dumps({"Records": [_record("p/sns")]})}
    await sqs.send_message(QueueUrl=url, MessageBody=json.dumps(sns))  # S3 → SNS → SQS
    await _notify(sqs, url, _record("p/x", bucket="other"), _record("q/outside"))
    await sqs.send_message(
        QueueUrl=url, MessageBody=json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"})
    )
    await poller.start()
    try:
        hints: dict[str, float] = {}

        async def received_all() -> bool:
            hints.update({h.key: h.time for h in await poller.poll()})
            return len(hints) == 4 and poller.deleted == 2

        await eventually(received_all, within=15)
        assert now - 61 <= hints["old"] <= now - 59  # at most max_event_age old
        assert now <= hints["future"] <= time.time()  # never in the future
        assert abs(hints["fine"] - (now - 5)) < 0.01
        assert (poller.messages, poller.poisoned, poller.held()) == (4, 0, 2)
        assert await _counts(sqs, url) == (0, 2)  # the irrelevant two are deleted at once

        capturing = {"old"}
        poller.settle(lambda key: key in capturing, 7)  # "old" not yet captured
        await asyncio.sleep(0.1)
        poller.ack(100)
        await eventually(lambda: poller.deleted == 3, within=5)  # the SNS one: durable
        assert poller.held() == 1
        capturing.clear()
        await asyncio.sleep(0.1)
        poller.settle(lambda key: False, 105)  # captured: its records lie before 105
        poller.ack(104)
        await asyncio.sleep(0.5)
        assert poller.held() == 1 and await _counts(sqs, url) == (0, 1)  # not durable yet
        poller.ack(105)
        await eventually(lambda: _empty(sqs, url), within=5)
        assert poller.deleted == 4 and not poller.lost_events()
    finally:
        await poller.stop()


async def test_a_message_never_acknowledged_comes_back_then_is_poison(
    moto_server: MotoServer, sqs: Any, sqs_keys: None, unique: str
) -> None:
    url = await _queue(sqs, unique)
    table = _sqs_table(moto_server, url, wait_time=1, visibility_timeout=1, max_receives=2)
    poller = SqsPoller(SqsEvents.model_validate(table), "data", "")
    await _notify(sqs, url, _record("stuck"))
    await poller.start()
    try:
        await eventually(lambda: poller.received == 1, within=10)
        assert await _counts(sqs, url) == (0, 1)  # hidden while held
        # never settled (its change never durable): back after 1 s, then once more → poison
        await eventually(lambda: poller.redelivered >= 1, within=10)
        await eventually(lambda: poller.poisoned == 1, within=10)
        await eventually(lambda: _empty(sqs, url), within=10)
        assert poller.received == 1  # its key was queued once (held: not again)
        assert poller.lost_events() and not poller.lost_events()  # a scan, said once
    finally:
        await poller.stop()


# --- end to end: SeaweedFS buckets, moto's SQS, shipper and sink --------------------------


def _rig(
    lab: Lab,
    cfg_a: AgentConfig,
    cfg_b: AgentConfig,
    unique: str,
    workdir: Path,
    moto: MotoServer,
    url: str,
    **sqs_extra: Any,
) -> Rig:
    table = _sqs_table(moto, url, **sqs_extra)
    opts = options(lab, f"{unique}/", events="sqs", sqs=table, scan_interval=3600)
    return Rig(unique, opts, cfg_a, cfg_b, workdir)


async def _present(dst: Bucket, key: str, body: bytes) -> bool:
    try:
        return await dst.read(key, "") == body
    except NotFound:
        return False


def _poller(source: object) -> SqsPoller:
    assert isinstance(source, ObjectsSource) and isinstance(source.tail, SqsPoller)
    return source.tail


@dataclass
class Gate:
    """Segments are published only while ``open`` is set (cleared: the vault hangs); with
    ``crash`` set, a segment waiting at the gate is never published: its task is
    cancelled, as when the agent stops."""

    open: asyncio.Event
    crash: asyncio.Event


@pytest.fixture
def vault_gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    gate = Gate(asyncio.Event(), asyncio.Event())
    gate.open.set()
    real = Vault.put_segment

    async def gated(self: Vault, ref: Any, blob: bytes) -> None:
        while not gate.open.is_set():
            if gate.crash.is_set():
                raise asyncio.CancelledError
            await asyncio.sleep(0.05)
        await real(self, ref, blob)

    monkeypatch.setattr(Vault, "put_segment", gated)
    return gate


@pytest.mark.lab
async def test_a_notification_ships_the_object_and_is_deleted_only_once_durable(
    lab: Lab,
    cfg_a: AgentConfig,
    cfg_b: AgentConfig,
    unique: str,
    tmp_path: Path,
    moto_server: MotoServer,
    sqs: Any,
    sqs_keys: None,
    vault_gate: Gate,
) -> None:
    """The vault hangs after the object is captured: the message stays undeleted, comes
    back after its visibility timeout (2 s) and is still not deleted; once the segment is
    durable it is deleted, and the object is in the mirror without a second scan."""
    url = await _queue(sqs, unique)
    rig = _rig(lab, cfg_a, cfg_b, unique, tmp_path, moto_server, url, visibility_timeout=2)
    src, dst = await rig.source_bucket(), await rig.mirror_bucket()
    try:
        async with rig.running() as (shipper, _):
            await eventually(lambda: shipper.source.scanner.scans >= 1, within=30)  # type: ignore[attr-defined]
            poller = _poller(shipper.source)
            vault_gate.open.clear()
            body = os.urandom(1500)
            await src.write("q/été 1.txt", body, "text/plain", {})
            await _notify(sqs, url, _record(f"{unique}/q/été 1.txt"))
            await eventually(lambda: poller.received == 1, within=15)
            await eventually(lambda: poller.redelivered >= 1, within=15)  # visibility timeout
            assert poller.deleted == 0 and poller.held() == 1
            assert not await _present(dst, "q/été 1.txt", body)
            vault_gate.open.set()
            await eventually(lambda: _present(dst, "q/été 1.txt", body), within=30)
            await eventually(lambda: _empty(sqs, url), within=15)
            assert (poller.deleted, poller.poisoned, poller.held()) == (1, 0, 0)
            assert shipper.source.scanner.scans == 1  # type: ignore[attr-defined]
    finally:
        vault_gate.open.set()
        await src.aclose()
        await dst.aclose()


@pytest.mark.lab
async def test_a_message_left_by_a_stopped_agent_returns_and_is_deleted_as_a_duplicate(
    lab: Lab,
    cfg_a: AgentConfig,
    cfg_b: AgentConfig,
    unique: str,
    tmp_path: Path,
    moto_server: MotoServer,
    sqs: Any,
    sqs_keys: None,
    vault_gate: Gate,
) -> None:
    """The agent stops before the change is durable: the message is not deleted. The next
    run's first scan ships the object; the message, back after its visibility timeout,
    names a key already durable, and is deleted."""
    url = await _queue(sqs, unique)
    rig = _rig(lab, cfg_a, cfg_b, unique, tmp_path, moto_server, url, visibility_timeout=3)
    src, dst = await rig.source_bucket(), await rig.mirror_bucket()
    body = os.urandom(900)
    try:
        async with rig.running() as (shipper, _):
            await eventually(lambda: shipper.source.scanner.scans >= 1, within=30)  # type: ignore[attr-defined]
            vault_gate.open.clear()
            await src.write("r/one", body, "", {})
            await _notify(sqs, url, _record(f"{unique}/r/one"))
            await eventually(lambda: _poller(shipper.source).received == 1, within=15)
            stopped = _poller(shipper.source)
            vault_gate.crash.set()  # the agent stops before the segment is durable
        assert stopped.deleted == 0 and await _counts(sqs, url) == (0, 1)  # left in flight
        vault_gate.open.set()
        async with rig.running() as (shipper, _):
            poller = _poller(shipper.source)
            await eventually(lambda: _present(dst, "r/one", body), within=30)
            await eventually(lambda: poller.received == 1, within=15)  # back, delivered again
            await eventually(lambda: _empty(sqs, url), within=15)
            assert (poller.deleted, poller.poisoned) == (1, 0)
    finally:
        vault_gate.open.set()
        await src.aclose()
        await dst.aclose()


@pytest.mark.lab
async def test_poison_messages_are_counted_deleted_and_block_nothing(
    lab: Lab,
    cfg_a: AgentConfig,
    cfg_b: AgentConfig,
    unique: str,
    tmp_path: Path,
    moto_server: MotoServer,
    sqs: Any,
    sqs_keys: None,
) -> None:
    """An unparseable body and a message already received max_receives times (by another
    consumer that never deleted it) are counted, deleted and answered by a scan; the good
    notification sent after them is shipped and deleted."""
    url = await _queue(sqs, unique)
    rig = _rig(lab, cfg_a, cfg_b, unique, tmp_path, moto_server, url, max_receives=2)
    src, dst = await rig.source_bucket(), await rig.mirror_bucket()
    await _notify(sqs, url, _record(f"{unique}/s/tired"))
    for _ in range(2):  # received twice, never deleted
        got = await sqs.receive_message(QueueUrl=url, VisibilityTimeout=0, WaitTimeSeconds=1)
        assert got.get("Messages")
    await sqs.send_message(QueueUrl=url, MessageBody="{not json")
    try:
        async with rig.running() as (shipper, _):
            await eventually(lambda: shipper.source.scanner.scans >= 1, within=30)  # type: ignore[attr-defined]
            poller = _poller(shipper.source)
            body = os.urandom(400)
            await src.write("s/good", body, "", {})
            await _notify(sqs, url, _record(f"{unique}/s/good"))
            await eventually(lambda: _present(dst, "s/good", body), within=30)
            await eventually(lambda: _empty(sqs, url), within=15)
            assert poller.poisoned == 2 and poller.deleted == 3
            # a scan answered the poison (what it named may be lost), and it ended
            await eventually(lambda: shipper.source.scanner.scans >= 2, within=30)  # type: ignore[attr-defined]
    finally:
        await src.aclose()
        await dst.aclose()
