"""Scrape-time failover metrics from a live ``Coordinator``.

``dragent_failover_lease_held``, ``dragent_failover_fenced``,
``dragent_failover_peer_up{peer}`` (this region's own probes of each other
region), ``dragent_failover_peer_heartbeat_age_seconds{peer}``,
``dragent_failover_lag_seconds``, ``dragent_failover_paused``,
``dragent_failover_ready{check}`` (readiness to take over, per check) and
``dragent_failover_last_rto_seconds`` / ``..._last_rpo_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from agent.coordination.coordinator import Coordinator


class FailoverCollector(Collector):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def collect(self) -> Iterator[Metric]:
        c = self.c
        yield _gauge("lease_held", "1 while this region holds the leader lease.", c.holding)
        yield _gauge("fenced", "1 while this region's database is fenced.", c.fenced)
        paused = c.view.paused if c.view else False
        yield _gauge("paused", "1 while automatic failover is paused cluster-wide.", paused)
        if c.lag is not None:
            yield _gauge("lag_seconds", "Leader heartbeats not yet replayed here.", c.lag)
        up = GaugeMetricFamily(
            "dragent_failover_peer_up", "1 if this region's probes reach the peer.", labels=["peer"]
        )
        age = GaugeMetricFamily(
            "dragent_failover_peer_heartbeat_age_seconds",
            "Age of the peer's last heartbeat seen by this region's probes.",
            labels=["peer"],
        )
        now = time.time()
        for peer, since in c.peers.down_since.items():
            up.add_metric([peer], 0.0 if since is not None else 1.0)
            if peer in c.peers.last_heartbeat:
                age.add_metric([peer], max(0.0, now - c.peers.last_heartbeat[peer]))
        yield up
        yield age
        ready = GaugeMetricFamily(
            "dragent_failover_ready", "1 if a readiness check passes.", labels=["check"]
        )
        for check, result in c.readiness.items():
            ready.add_metric([check], 1.0 if result["ok"] else 0.0)
        yield ready
        record = c.last_record or {}
        if record.get("rto_seconds") is not None:
            yield _gauge("last_rto_seconds", "RTO of the last failover.", record["rto_seconds"])
        if record.get("rpo_seconds") is not None:
            yield _gauge("last_rpo_seconds", "RPO of the last failover.", record["rpo_seconds"])


def _gauge(name: str, text: str, value: float | bool) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"dragent_failover_{name}", text, value=float(value))
