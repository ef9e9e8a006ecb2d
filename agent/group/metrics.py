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
        for name, text, value in (
            ("dragent_group_members", "Agents of this region's group seen in etcd", len(m.members)),
            ("dragent_group_partitions_owned", "Partitions this agent runs now", len(m.owned)),
            ("dragent_group_partitions", "Partitions the group shares", len(m.parts)),
            (
                "dragent_group_fenced",
                "1 while this agent could not renew its membership in time (runs nothing)",
                int(m.fenced),
            ),
            ("dragent_group_takes", "Partitions this agent has taken since it started", m.takes),
        ):
            family = GaugeMetricFamily(name, text, labels=["region", "instance"])
            family.add_metric([m.region, m.instance], value)
            yield family
