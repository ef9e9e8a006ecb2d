"""The group's gauges: members seen, partitions owned (by this agent), fenced."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.group.member import GroupMember


class GroupCollector(Collector):
    def __init__(self, member: GroupMember) -> None:
        self.member = member

    def collect(self) -> Iterator[GaugeMetricFamily]:
        m = self.member
        labels = ["region", "instance"]
        values = [m.region, m.instance]
        members = GaugeMetricFamily(
            "dragent_group_members", "Agents of this region's group seen in etcd", labels=labels
        )
        members.add_metric(values, len(m.members))
        owned = GaugeMetricFamily(
            "dragent_group_partitions_owned",
            "Partitions this agent runs now",
            labels=labels,
        )
        owned.add_metric(values, len(m.owned))
        total = GaugeMetricFamily(
            "dragent_group_partitions", "Partitions the group shares", labels=labels
        )
        total.add_metric(values, len(m.parts))
        fenced = GaugeMetricFamily(
            "dragent_group_fenced",
            "1 while this agent could not renew its membership in time (runs nothing)",
            labels=labels,
        )
        fenced.add_metric(values, int(m.fenced))
        handovers = GaugeMetricFamily(
            "dragent_group_takes", "Partitions this agent has taken since it started", labels=labels
        )
        handovers.add_metric(values, m.takes)
        yield from (members, owned, total, fenced, handovers)
