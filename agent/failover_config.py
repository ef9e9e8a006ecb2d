"""``[etcd]`` and ``[failover]``: coordination between regions and the witness."""

from __future__ import annotations

from agent.configbase import Section


class EtcdConfig(Section):
    endpoints: list[str] = []
    prefix: str = "/dragent"


class FailoverConfig(Section):
    """Automatic failover settings (leader lease, fencing, guard rails, switches)."""

    automatic: bool = False
