"""Prometheus instruments of the replication path, on an injected registry.

Labels stay low-cardinality: stream, destination or origin region, outcome.
Values derived from state (RPO, watermarks) are not here: the agent's
collector computes them at scrape time from ``StreamProgress``.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 300)


class Metrics:
    """Every replication instrument, registered once on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.segments = Counter(
            "dragent_segments",
            "Segments by stream and outcome (sealed, applied, rejected).",
            ["stream", "peer", "outcome"],
            registry=registry,
        )
        self.records = Counter(
            "dragent_records",
            "Records sealed or applied.",
            ["stream", "peer", "outcome"],
            registry=registry,
        )
        self.bytes = Counter(
            "dragent_segment_bytes",
            "Record bytes (raw) and sealed segment bytes (stored).",
            ["stream", "peer", "kind"],
            registry=registry,
        )
        self.latency = Histogram(
            "dragent_replication_latency_seconds",
            "Per segment: time from its oldest change at the source to durable in the vault.",
            ["stream", "peer"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.apply_latency = Histogram(
            "dragent_apply_latency_seconds",
            "Per segment: time from its oldest change at the source to applied in the target.",
            ["stream", "peer"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.put_seconds = Histogram(
            "dragent_vault_put_seconds",
            "Time to publish one segment in the vault.",
            ["stream", "peer"],
            registry=registry,
        )
        self.restarts = Counter(
            "dragent_stream_restarts",
            "Stream task restarts after an error.",
            ["stream", "error"],
            registry=registry,
        )

    def stream(self, stream: str, peer: str) -> StreamMetrics:
        return StreamMetrics(self, stream, peer)


class StreamMetrics:
    """The instruments of one (stream, peer) pair."""

    def __init__(self, metrics: Metrics, stream: str, peer: str) -> None:
        self._m = metrics
        self._labels = (stream, peer)
        self.put_seconds = metrics.put_seconds.labels(stream, peer)

    def sealed(self, records: Sequence[bytes], stored: int, latency: float) -> None:
        stream, peer = self._labels
        self._m.segments.labels(stream, peer, "sealed").inc()
        self._m.records.labels(stream, peer, "sealed").inc(len(records))
        self._m.bytes.labels(stream, peer, "raw").inc(sum(map(len, records)))
        self._m.bytes.labels(stream, peer, "stored").inc(stored)
        self._m.latency.labels(stream, peer).observe(latency)

    def applied(self, count: int, latency: float) -> None:
        stream, peer = self._labels
        self._m.segments.labels(stream, peer, "applied").inc()
        self._m.records.labels(stream, peer, "applied").inc(count)
        self._m.apply_latency.labels(stream, peer).observe(latency)

    def rejected(self) -> None:
        stream, peer = self._labels
        self._m.segments.labels(stream, peer, "rejected").inc()

    def quarantined(self) -> None:
        """A stale segment (an older epoch superseded by a newer one) was refused."""
        stream, peer = self._labels
        self._m.segments.labels(stream, peer, "quarantined").inc()
