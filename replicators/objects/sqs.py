"""S3 event notifications read from an SQS queue (S3 → SQS, or S3 → SNS → SQS).

The same interface as ``S3Webhook`` (``start``, ``poll``, ``lost_events``, ``stop``;
``since`` and ``drained_at`` always None), plus what ties a message's deletion to
durability: ``settle(capturing, position)``, ``ack(position)`` and ``forget()``.

- **Long polling**: ``ReceiveMessage`` with ``WaitTimeSeconds`` (up to 10 messages),
  the configured ``VisibilityTimeout``, and each message's ``ApproximateReceiveCount``
  and ``SentTimestamp``. Receiving pauses while ``max_pending`` messages are held.
- **Parsing** is the webhook's: ``events.s3_event_hints`` (an SNS envelope is opened
  first). Hints for the source bucket/prefix go to the source's queue, their times
  clamped to [sent - ``max_event_age``, received]; a message naming none of its keys
  (another bucket or prefix, ``s3:TestEvent``) is deleted at once.
- **Deleted only once durable.** A message with hints is *held*. When none of its keys
  is left to capture (queued, read ahead or in transfer: the source's ``capturing``),
  it gets a barrier, the source's position then: every record capturing those keys
  lies before it, and a key found unchanged was already shipped before it. Once the
  shipper acks a position at or past the barrier, every change the message named is
  durable in the vault, and the message is deleted (``DeleteMessageBatch``, from a task
  of its own, so acks never wait for SQS).
- **Visibility timeout.** A message not deleted in time (its changes not yet durable,
  an agent that stopped) is delivered again: held, its newer receipt handle replaces
  the old one; after ``forget()`` it is a new message, whose keys are queued again
  (harmless: capture reads a key's current state).
- **Poison**: a body that is not a JSON notification, or a message received more than
  ``max_receives`` times, is counted (``poisoned``), logged and deleted, never left to
  block the queue, and the source is asked for a scan (``lost_events``), which catches
  whatever it may have named. SQS being unreachable loses nothing (the messages wait in
  the queue): receiving is retried with backoff.

Like the webhook's, its silence proves nothing (``drained_at`` is None): S3's delivery
into the queue is not observed, so an idle stream's RPO rests on the scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from replicators import logs
from replicators.objects.events import Hint, s3_event_hints
from replicators.objects.options import SqsEvents

log = logs.get("objects")
SETTLE_EVERY = 0.05
"""Seconds between two looks at which held messages are settled (a barrier set later is
only more conservative)."""
BATCH = 10
"""SQS's most messages per ReceiveMessage and per DeleteMessageBatch."""
MAX_BACKOFF = 30.0
STOP_FLUSH = 2.0
"""Seconds ``stop`` spends deleting what is already durable (the rest comes back)."""


class PoisonMessage(ValueError):
    """A message body that is not an S3 event notification."""


@dataclass
class Held:
    """A received message whose changes are not yet known durable."""

    receipt: str
    keys: frozenset[str]
    handed: bool = False
    """Its hints were returned by ``poll`` (so its keys are in the source's queue)."""
    barrier: int | None = None


def parse_body(body: str) -> dict[str, Any]:
    """The S3 event notification in a message body (opening an SNS envelope).
    Raises ``PoisonMessage`` for anything that is not a JSON object."""
    try:
        message = json.loads(body)
        if (
            isinstance(message, dict)
            and message.get("Type") == "Notification"
            and isinstance(message.get("Message"), str)
        ):
            message = json.loads(message["Message"])
    except ValueError as exc:
        raise PoisonMessage(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise PoisonMessage("not a JSON object")
    return message


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


class SqsPoller:
    def __init__(
        self,
        cfg: SqsEvents,
        bucket: str,
        prefix: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.bucket = bucket
        self.prefix = prefix
        self.clock = clock
        self.since: float | None = None
        self.drained_at: float | None = None
        self.received = 0
        """Hints handed on."""
        self.messages = 0
        """Messages received, deliveries again included."""
        self.redelivered = 0
        """Deliveries of a message still held (not deleted within its visibility timeout)."""
        self.deleted = 0
        self.poisoned = 0
        self._pending: list[Hint] = []
        self._held: dict[str, Held] = {}
        self._doomed: dict[str, str] = {}
        """Message id → receipt handle: to delete (durable, irrelevant or poison)."""
        self._acked = -1
        self._lost = False
        self._last_settle = 0.0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- the tail interface --------------------------------------------------------------

    async def start(self) -> None:
        """Start receiving and deleting (a no-op if running)."""
        if self._tasks:
            return
        stack = contextlib.AsyncExitStack()
        self._client = await stack.enter_async_context(
            get_session().create_client("sqs", **self._client_args())
        )
        self._stack = stack
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="sqs-receive"),
            asyncio.create_task(self._delete_loop(), name="sqs-delete"),
        ]

    async def poll(self) -> list[Hint]:
        """The hints received since the last call."""
        for held in self._held.values():
            held.handed = True
        hints, self._pending = self._pending, []
        return hints

    def lost_events(self) -> bool:
        """True once after a poison message was deleted (the source then scans)."""
        lost, self._lost = self._lost, False
        return lost

    async def stop(self) -> None:
        """Stop receiving; delete what is known durable (briefly); held messages come back."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._doomed and self._client is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_FLUSH):
                    while self._doomed and await self._delete_some():
                        pass
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    # -- durability ----------------------------------------------------------------------

    def settle(self, capturing: Callable[[str], bool], position: int) -> None:
        """Give every held message none of whose keys is ``capturing`` the barrier
        ``position`` (the source's next position); delete those already acked."""
        now = time.monotonic()
        if now - self._last_settle < SETTLE_EVERY:
            return
        self._last_settle = now
        for held in self._held.values():
            if held.barrier is None and held.handed and not any(map(capturing, held.keys)):
                held.barrier = position
        self._release()

    def ack(self, position: int) -> None:
        """Records before ``position`` are durable in the vault."""
        self._acked = max(self._acked, position)
        self._release()

    def forget(self) -> None:
        """The source dropped what it had in flight: drop held messages undeleted (they
        are delivered again after their visibility timeout)."""
        self._held.clear()
        self._pending.clear()
        self._room.set()

    def held(self) -> int:
        return len(self._held)

    def _release(self) -> None:
        for mid, held in list(self._held.items()):
            if held.barrier is not None and held.barrier <= self._acked:
                del self._held[mid]
                self._doomed[mid] = held.receipt
        if self._doomed:
            self._wake.set()

    # -- receiving -----------------------------------------------------------------------

    def _client_args(self) -> dict[str, Any]:
        cfg = self.cfg
        config = AioConfig(
            connect_timeout=5,
            read_timeout=cfg.wait_time + 10,
            retries={"mode": "standard", "max_attempts": 3},
        )
        args: dict[str, Any] = {"region_name": cfg.region_name, "config": config}
        if cfg.endpoint:
            args["endpoint_url"] = cfg.endpoint
        if cfg.access_key and cfg.secret_key:
            args["aws_access_key_id"] = cfg.access_key.reveal()
            args["aws_secret_access_key"] = cfg.secret_key.reveal()
        return args

    async def _receive_loop(self) -> None:
        cfg = self.cfg
        delay = 0.0
        while True:
            if len(self._held) + len(self._doomed) >= cfg.max_pending:
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._room.wait()
                continue
            try:
                answer = await self._client.receive_message(
                    QueueUrl=cfg.queue_url,
                    MaxNumberOfMessages=BATCH,
                    WaitTimeSeconds=cfg.wait_time,
                    VisibilityTimeout=cfg.visibility_timeout,
                    MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
                )
            except Exception as exc:  # unreachable, refused: the messages wait in the queue
                delay = min(max(1.0, 2 * delay), MAX_BACKOFF)
                log.warning("sqs receive failed", queue=cfg.queue_url, error=str(exc), retry=delay)
                await asyncio.sleep(delay)
                continue
            delay = 0.0
            now = self.clock()
            for message in answer.get("Messages", []) or []:
                self._take(message, now)
            if self._doomed:
                self._wake.set()

    def _take(self, message: dict[str, Any], now: float) -> None:
        """One received message: held with its hints, or to delete (irrelevant, poison)."""
        mid = str(message.get("MessageId", ""))
        receipt = str(message.get("ReceiptHandle", ""))
        attributes = message.get("Attributes") or {}
        count = _int(attributes.get("ApproximateReceiveCount"), 1)
        self.messages += 1
        if mid in self._doomed:
            self._doomed[mid] = receipt  # the newest handle deletes it
            return
        held = self._held.get(mid)
        if held is not None:
            self.redelivered += 1
            held.receipt = receipt
            if count > self.cfg.max_receives:
                del self._held[mid]
                self._poison(mid, receipt, f"received {count} times")
            return
        if count > self.cfg.max_receives:
            self._poison(mid, receipt, f"received {count} times")
            return
        try:
            hints = s3_event_hints(parse_body(str(message.get("Body", ""))))
        except (ValueError, AttributeError, TypeError) as exc:  # PoisonMessage, a bad shape
            self._poison(mid, receipt, str(exc) or type(exc).__name__)
            return
        mine = [h for h in hints if h.bucket == self.bucket and h.key.startswith(self.prefix)]
        if not mine:
            self._doomed[mid] = receipt  # nothing of this stream's: irrelevant
            return
        sent = _int(attributes.get("SentTimestamp"), 0) / 1000 or now
        floor = min(now, sent) - self.cfg.max_event_age
        for hint in mine:
            when = min(now, max(hint.time, floor))
            key = hint.key[len(self.prefix) :]
            self._pending.append(Hint(hint.bucket, key, when, hint.deleted, hint.sequencer))
            self.received += 1
        self._held[mid] = Held(receipt, frozenset(h.key[len(self.prefix) :] for h in mine))

    def _poison(self, mid: str, receipt: str, why: str) -> None:
        self.poisoned += 1
        self._lost = True
        self._doomed[mid] = receipt
        log.warning(
            "sqs poison message deleted; a scan covers it",
            queue=self.cfg.queue_url,
            message_id=mid,
            reason=why[:200],
        )

    # -- deleting ------------------------------------------------------------------------

    async def _delete_loop(self) -> None:
        delay = 0.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._doomed:
                if await self._delete_some():
                    delay = 0.0
                    continue
                delay = min(max(1.0, 2 * delay), MAX_BACKOFF)
                await asyncio.sleep(delay)

    async def _delete_some(self) -> bool:
        """Delete up to ``BATCH`` doomed messages; False if SQS could not be asked."""
        batch = list(self._doomed.items())[:BATCH]
        entries = [{"Id": str(i), "ReceiptHandle": r} for i, (_, r) in enumerate(batch)]
        try:
            answer = await self._client.delete_message_batch(
                QueueUrl=self.cfg.queue_url, Entries=entries
            )
        except Exception as exc:
            log.warning("sqs delete failed", queue=self.cfg.queue_url, error=str(exc))
            return False
        failed = {str(f.get("Id")): f for f in answer.get("Failed", []) or []}
        for i, (mid, receipt) in enumerate(batch):
            if self._doomed.get(mid) == receipt:  # else delivered again meanwhile: newer handle
                del self._doomed[mid]
            if str(i) in failed:  # it is delivered again and handled again: harmless
                error = failed[str(i)]
                log.warning("sqs message not deleted", message_id=mid, error=error.get("Code"))
            else:
                self.deleted += 1
        self._room.set()
        return True
