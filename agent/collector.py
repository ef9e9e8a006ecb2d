"""Scrape-time metrics derived from stream progress: RPO, watermarks, lag, state.

Computed when Prometheus scrapes, from the live ``StreamProgress`` objects,
so the figures are never stale copies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.config import PolicyConfig
from agent.supervise import StreamTask
from replicators.progress import STAGES

STATES = ("starting", "running", "retrying", "halted", "stopped")


class ProgressCollector(Collector):
    def __init__(
        self,
        region: str,
        tasks: Callable[[], Sequence[StreamTask]],
        role: Callable[[], str],
        epoch: Callable[[], int],
        policy: Callable[[], PolicyConfig],
    ) -> None:
        self.region = region
        self._tasks = tasks
        self._role = role
        self._epoch = epoch
        self._policy = policy

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        info = GaugeMetricFamily(
            "dragent_role", "1 for the role this agent holds.", labels=["role"]
        )
        for role in ("active", "passive", "fenced"):
            info.add_metric([role], 1.0 if self._role() == role else 0.0)
        yield info
        yield GaugeMetricFamily("dragent_epoch", "Current failover epoch.", value=self._epoch())
        rpo = GaugeMetricFamily(
            "dragent_rpo_seconds",
            "Measured RPO: now minus the newest proof that every change was durable in the "
            "destination, or the age of the oldest change known not to be; grows while the "
            "stream is not running.",
            labels=["stream", "peer"],
        )
        target = GaugeMetricFamily(
            "dragent_rpo_target_seconds", "RPO target from the policy.", labels=["stream"]
        )
        position = GaugeMetricFamily(
            "dragent_watermark_position",
            "Watermark position in the stream's units.",
            labels=["stream", "peer", "watermark"],
        )
        source_time = GaugeMetricFamily(
            "dragent_watermark_source_time_seconds",
            "Source time (unix) of the last change at each watermark.",
            labels=["stream", "peer", "watermark"],
        )
        lag = GaugeMetricFamily(
            "dragent_apply_lag_seconds",
            "Passive side: now minus the source time of the last applied change.",
            labels=["stream"],
        )
        state = GaugeMetricFamily(
            "dragent_stream_state", "1 for the stream task's state.", labels=["stream", "state"]
        )
        pending = GaugeMetricFamily(
            "dragent_source_pending",
            "Changes a source has seen but not yet shipped (objects, bytes), where it counts them.",
            labels=["stream", "peer", "unit"],
        )
        repairs = GaugeMetricFamily(
            "dragent_repairs",
            "Differences repaired by the stream's anti-entropy job since the agent started.",
            labels=["stream"],
        )
        policy = self._policy()
        targeted: set[str] = set()
        for task in self._tasks():
            p = task.progress
            for s in STATES:
                state.add_metric([task.name, s], 1.0 if task.state == s else 0.0)
            for stage in STAGES:
                mark = p.marks.get(stage)
                if mark is not None:
                    position.add_metric([p.stream, p.peer, stage], float(mark.position))
                    source_time.add_metric([p.stream, p.peer, stage], mark.source_time)
            _counts(task, pending, repairs)
            if p.side == "source":
                rpo.add_metric([p.stream, p.peer], p.rpo(now))
                if p.stream not in targeted:
                    targeted.add(p.stream)
                    target.add_metric([p.stream], policy.rpo_target(p.stream))
            else:
                applied = p.lag("applied", now)
                if applied is not None:
                    lag.add_metric([p.stream], applied)
        yield from (rpo, target, position, source_time, lag, state, pending, repairs)


def _counts(task: StreamTask, pending: GaugeMetricFamily, repairs: GaugeMetricFamily) -> None:
    """Optional figures a kind's source or job exposes: ``pending_counts()``, ``repairs``."""
    p = task.progress
    counts = getattr(getattr(task.runner, "source", None), "pending_counts", None)
    if p.side == "source" and counts is not None:
        for unit, value in counts().items():
            pending.add_metric([p.stream, p.peer, unit], float(value))
    if p.side == "job" and isinstance(getattr(task.runner, "repairs", None), int):
        repairs.add_metric([p.stream], float(task.runner.repairs))
