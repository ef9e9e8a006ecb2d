"""What the registry (``replicators.registry``) calls for a ``synthetic`` stream."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from replicators.synthetic.source import SyntheticSource
from replicators.synthetic.target import SyntheticTarget
from replicators.synthetic.verify import verify as verify  # the kind's on-demand check

if TYPE_CHECKING:
    from replicators.settings import AgentSettings, PeerSettings, StreamSettings
    from replicators.stream import Source, Target

KIND = "synthetic"


def source(
    stream: StreamSettings, agent: AgentSettings, peer: PeerSettings, state_dir: Path
) -> Source:
    return SyntheticSource(stream.synthetic)


def target(stream: StreamSettings, agent: AgentSettings, state_dir: Path) -> Target:
    return SyntheticTarget(state_dir)
