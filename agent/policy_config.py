"""``[policy]``: recovery objectives and the compliance policy."""

from __future__ import annotations

from agent.configbase import PositiveDuration, Section


class PolicyConfig(Section):
    """Recovery objectives and compliance policy, per stream where it matters."""

    rpo_seconds: dict[str, PositiveDuration] = {}
    default_rpo_seconds: PositiveDuration = 5.0
    rto_seconds: PositiveDuration = 60.0

    def rpo_target(self, stream: str) -> float:
        return self.rpo_seconds.get(stream, self.default_rpo_seconds)
