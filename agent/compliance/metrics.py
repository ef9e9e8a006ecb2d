"""The compliance monitor's metrics, read at scrape time: each control's status, the
restore drills (last success, achieved RTO) and the age of each key, which the alert
rules use."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.compliance import controls as c

if TYPE_CHECKING:
    from agent.compliance.monitor import ComplianceMonitor


class ComplianceCollector(Collector):
    """Scrape-time metrics from the monitor's last evaluation."""

    def __init__(self, monitor: ComplianceMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        m = self.monitor
        control = GaugeMetricFamily(
            "dragent_compliance_control",
            "1 for the control's current status (pass, fail, unknown).",
            labels=["control", "status"],
        )
        for r in m.results:
            for s in c.STATUSES:
                control.add_metric([r.control, s], 1.0 if r.status == s else 0.0)
        yield control
        yield from self._drills()
        yield from self._keys()

    def _drills(self) -> Iterator[Metric]:
        m, policy = self.monitor, self.monitor.cfg.policy
        last = GaugeMetricFamily(
            "dragent_drill_last_success_timestamp_seconds",
            "Unix time of the last successful drill, by drill.",
            labels=["drill"],
        )
        every = GaugeMetricFamily(
            "dragent_drill_interval_seconds", "Drill interval from the policy.", labels=["drill"]
        )
        duration = GaugeMetricFamily(
            "dragent_drill_last_duration_seconds",
            "Measured RTO of the last drill, by drill.",
            labels=["drill"],
        )
        drills = {
            "restore": ((c.DRILL_RESTORE,), policy.drill_every),
            "failover": (c.FAILOVER_KINDS, max(c.YEAR, policy.drill_every)),
        }
        for name, (kinds, interval) in drills.items():
            every.add_metric([name], interval)
            when = m.last_success(kinds)
            if m.evaluated_at is not None:
                last.add_metric([name], when or 0.0)
            latest = c.of_type(m.entries(), *kinds)
            rto = latest[-1]["data"].get("rto_seconds") if latest else None
            if isinstance(rto, int | float):
                duration.add_metric([name], float(rto))
        yield last
        yield every
        yield duration

    def _keys(self) -> Iterator[Metric]:
        m = self.monitor
        age = GaugeMetricFamily(
            "dragent_key_age_seconds", "Age of the current key-encryption key.", labels=["key"]
        )
        limit = GaugeMetricFamily(
            "dragent_key_max_age_seconds", "Maximum key age from the policy.", labels=["key"]
        )
        now = time.time()
        for name, (_, created) in sorted(m.keys.items()):
            limit.add_metric([name], m.cfg.policy.max_key_age)
            if created is not None:
                age.add_metric([name], max(0.0, now - created))
        yield age
        yield limit
