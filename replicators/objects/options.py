"""``[streams.objects]``: the source bucket, the mirror bucket, capture and transfer settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ByteSize, Field, model_validator

from replicators.objects.guard import GuardPolicy
from replicators.settings import Duration, PositiveDuration, S3Config, SecretRef, Section


class FilerEvents(Section):
    """SeaweedFS filer metadata subscription (``weed filer.meta.tail``) on the source."""

    filer: str = Field(pattern=r"^[^:\s]+:\d+(\.\d+)?$")
    """The source filer as HOST:PORT or HOST:PORT.GRPCPORT (e.g. 127.0.0.1:8888.18888)."""
    weed: str = "weed"
    """The ``weed`` binary (a path or a name on PATH)."""
    buckets_dir: str = "/buckets"


class WebhookEvents(Section):
    """S3 event notifications POSTed to ``http://LISTEN/events`` (MinIO webhook, relays)."""

    listen: str = Field(default="127.0.0.1:7071", pattern=r"^[^\s]+:\d+$")
    token: SecretRef | None = None
    """If set, requests must carry ``Authorization: Bearer <token>``; required when
    ``listen`` is not a loopback address."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    """HTTPS with this certificate chain and key (PEM); required, with ``token``, when
    ``listen`` is not a loopback address: the token must never cross a network in clear."""
    max_pending: int = Field(default=10_000, ge=1)
    """Hints held between polls; past it they are dropped and a scan is asked for."""
    max_event_age: PositiveDuration = 300.0
    """An event's time is clamped to [received - this, received]: a forged or skewed
    ``eventTime`` cannot make the RPO look older (or younger) than that."""

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> WebhookEvents:
        host = self.listen.rpartition(":")[0].strip("[]")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither")
        if host in ("127.0.0.1", "localhost", "::1"):
            return self
        if self.token is None:
            raise ValueError(
                f"listen {self.listen} is reachable beyond this host: set token (a secret "
                "reference) so that only the notifier can post events"
            )
        if self.tls_cert is None:
            raise ValueError(
                f"listen {self.listen} is reachable beyond this host: set tls_cert and "
                "tls_key so that the token and the events travel encrypted"
            )
        return self


class SqsEvents(Section):
    """S3 event notifications delivered to an SQS queue (S3 → SQS, or through SNS), read by
    long polling. The queue must be this stream's alone: a message naming no key of the
    source bucket/prefix is deleted as irrelevant."""

    queue_url: str = Field(pattern=r"^https?://\S+$")
    region_name: str = "us-east-1"
    endpoint: str | None = None
    """Unset: AWS's SQS endpoint for ``region_name``."""
    access_key: SecretRef | None = None
    secret_key: SecretRef | None = None
    wait_time: int = Field(default=20, ge=1, le=20)
    """Long polling: seconds one ReceiveMessage waits for a message (``WaitTimeSeconds``)."""
    visibility_timeout: int = Field(default=300, ge=1, le=43200)
    """Seconds a received message stays hidden; one not deleted by then (its changes not yet
    durable, an agent that died) is delivered again."""
    max_receives: int = Field(default=5, ge=1)
    """A message received more often than this (``ApproximateReceiveCount``) is poison:
    counted, deleted, and a scan asked for, so it never blocks the queue."""
    max_pending: int = Field(default=1000, ge=1)
    """Messages received and not yet deleted; at this many, receiving pauses."""
    max_event_age: PositiveDuration = 300.0
    """An event's time is clamped to [sent - this, received] (sent: when SQS got the
    message): a forged or skewed ``eventTime`` cannot make the RPO look older or younger."""

    @model_validator(mode="after")
    def _both_keys(self) -> SqsEvents:
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("access_key and secret_key go together (or neither: the AWS chain)")
        return self


class DeleteGuard(Section):
    """The passive side's mass-delete guard (``[streams.objects.delete_guard]``; see
    docs/objects-guard.md): when the deletes applied to the mirror within ``window`` would
    exceed ``min(count, max(min_deletes, share × the mirror's keys))``, further deletes are
    held (puts keep flowing) until an operator approves or rejects them.

    Defaults, and why: ``share`` 5 % in 10 minutes: a ransomware or a wrong script removes
    a large part of a bucket in minutes, while ordinary workloads (expiring temporary
    objects, rewriting datasets) rarely remove a twentieth of a bucket that fast; ``count``
    10,000 caps what can land in a very large bucket before a human looks (the vault keeps
    every version, but the warm mirror is what serves after a failover); ``min_deletes``
    100: below that many deletes in a window the guard never trips, so a small bucket's
    housekeeping (or a test deleting a few keys of forty) is not a mass delete, at the cost
    that up to 100 deletes of a small bucket land before it trips. 10 minutes: long
    enough to catch a script that deletes in batches, short enough that a steady trickle of
    expiries does not add up."""

    enabled: bool = True
    share: float = Field(default=0.05, gt=0, le=1)
    """A fraction of the mirror's keys (before the window's deletes)."""
    count: int = Field(default=10_000, ge=1)
    """An absolute number of deletes, whatever the mirror's size."""
    window: PositiveDuration = 600.0
    min_deletes: int = Field(default=100, ge=0)
    """Fewer deletes than this in a window never trip the guard."""

    def policy(self) -> GuardPolicy:
        return GuardPolicy(
            share=self.share,
            count=self.count,
            window=self.window,
            min_deletes=self.min_deletes,
            enabled=self.enabled,
        )


class ObjectsOptions(Section):
    source: S3Config
    """The bucket (and prefix) replicated, in the active region."""
    mirror: S3Config
    """The ready-to-serve copy, in the passive region."""
    source_region: str | None = None
    """The region whose bucket ``source`` is. Set it (on every region's copy of the stream)
    and the stream follows the roles: after a takeover the new active region ships from its
    bucket (``mirror``, now serving) to the old one's (``source``), whose agent applies
    into it once it returns as passive. Unset: ``source`` always ships to ``mirror``."""
    buckets: dict[str, S3Config] = {}
    """Three regions or more: every region's copy of the bucket, by region name (with
    ``source_region``, the region ``source`` is). The stream then follows the roles among
    all of them: the active region ships from its bucket, and each passive region applies
    into its own (``ObjectsOptions.between``). ``source`` and ``mirror`` may be left out:
    they default to ``buckets[source_region]`` and the first other region's bucket."""
    filers: dict[str, FilerEvents] = {}
    """With ``buckets``: each region's filer, for events while that region is active (a
    region without one scans); ``filer`` defaults to ``filers[source_region]``."""
    mirror_filer: FilerEvents | None = None
    """The mirror region's filer, for events while that region is active (else it scans)."""
    events: Literal["none", "filer", "webhook", "sqs"] = "none"
    """Push capture: ``filer`` subscribes to the SeaweedFS filer, ``webhook`` receives S3
    event notifications, ``sqs`` reads them from an SQS queue; ``none`` relies on the scan."""
    filer: FilerEvents | None = None
    webhook: WebhookEvents = WebhookEvents()
    sqs: SqsEvents | None = None
    scan_interval: PositiveDuration = 60.0
    """A full listing scan (the safety net) starts this long after the previous one ended."""
    verify_interval: Duration = 0.0
    """The active agent compares source and mirror (Merkle) and repairs this often; 0: never."""
    inline_max: ByteSize = ByteSize(2 * 1024 * 1024)
    """Objects up to this size travel inline in one record; larger ones in parts."""
    part_size: ByteSize = ByteSize(5 * 1024 * 1024)
    """Size of one part of a large object (at least 5 MiB, the S3 minimum part)."""
    delete_guard: DeleteGuard = DeleteGuard()
    """The mirror's mass-delete guard (see ``DeleteGuard``)."""

    def between(self, active_region: str, mirror_region: str) -> ObjectsOptions:
        """These options for the copy from ``active_region``'s bucket to
        ``mirror_region``'s: ``buckets`` picks both; without it, ``oriented``."""
        if not self.buckets:
            return self.oriented(active_region)
        events = self.events
        if events == "filer":
            events = "filer" if active_region in self.filers else "none"
        elif events == "sqs" and active_region != self.source_region:
            events = "none"  # the queue carries the first source bucket's notifications only
        return self.model_copy(
            update={
                "source": self.buckets[active_region],
                "mirror": self.buckets[mirror_region],
                "source_region": active_region,
                "filer": self.filers.get(active_region, self.filer),
                "events": events,
            }
        )

    def oriented(self, active_region: str) -> ObjectsOptions:
        """These options as they are while ``active_region`` is active: ``source`` its
        bucket, ``mirror`` the other's. Unchanged without ``source_region``."""
        if self.source_region is None or active_region == self.source_region:
            return self
        events = self.events if self.events != "filer" or self.mirror_filer else "none"
        if events == "sqs":
            events = "none"  # the queue carries the source bucket's notifications only
        return self.model_copy(
            update={
                "source": self.mirror,
                "mirror": self.source,
                "source_region": active_region,
                "filer": self.mirror_filer,
                "mirror_filer": self.filer,
                "events": events,
            }
        )

    @model_validator(mode="before")
    @classmethod
    def _from_buckets(cls, data: Any) -> Any:
        """With ``buckets``, ``source`` and ``mirror`` default from it."""
        if not isinstance(data, dict) or not data.get("buckets"):
            return data
        buckets, first = data["buckets"], data.get("source_region")
        if not isinstance(buckets, dict) or first not in buckets or len(buckets) < 2:
            raise ValueError("buckets: name at least two regions, source_region among them")
        other = next(r for r in buckets if r != first)
        defaults = {"source": buckets[first], "mirror": buckets[other]}
        filers = data.get("filers") or {}
        if isinstance(filers, dict) and first in filers:
            defaults["filer"] = filers[first]
        return defaults | data

    @model_validator(mode="after")
    def _checks(self) -> ObjectsOptions:
        if self.events == "filer" and self.filer is None:
            raise ValueError("events = 'filer' needs a [streams.objects.filer] table")
        if self.events == "sqs" and self.sqs is None:
            raise ValueError("events = 'sqs' needs a [streams.objects.sqs] table (queue_url)")
        if self.mirror_filer is not None and self.source_region is None:
            raise ValueError("mirror_filer is used only with source_region (set both or neither)")
        if self.part_size < 5 * 1024 * 1024:
            raise ValueError("part_size must be at least 5MiB (the S3 minimum part size)")
        if self.inline_max > self.part_size:
            raise ValueError("inline_max must not exceed part_size")
        return self
