"""Stream kinds: one module per kind, each with the same functions.

A kind's module (``KIND_MODULES``) provides:

- ``source(stream, agent, peer, state_dir) -> Source`` — the active side's
  capture for one destination ``peer``; ``state_dir`` is private to that pair.
- ``target(stream, agent, state_dir) -> Target`` — the passive side's copy.
- optionally ``background(stream, agent, role, state_dir) -> list[Background]``
  — extra periodic jobs of the kind (a base-backup schedule, a reconcile
  scan), run by the same supervising loop as the streams.

Modules are imported when a configuration uses the kind, so a kind's
dependencies cost nothing to agents that do not run it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from replicators.settings import AgentSettings, PeerSettings, StreamSettings
    from replicators.stream import Source, Target

KIND_MODULES = {
    "synthetic": "replicators.synthetic.kind",
    "postgres": "replicators.postgres.kind",
    "objects": "replicators.objects.kind",
    "artifacts": "replicators.artifacts.kind",
}


@dataclass(frozen=True)
class Background:
    """A periodic job: ``runner`` has ``recover()`` and ``sync_once(stop)``; ``every`` seconds."""

    name: str
    runner: Any
    every: float


def module(kind: str) -> ModuleType:
    try:
        return importlib.import_module(KIND_MODULES[kind])
    except KeyError:
        raise ValueError(f"unknown stream kind {kind!r}; known: {sorted(KIND_MODULES)}") from None


def build_source(
    stream: StreamSettings, agent: AgentSettings, peer: PeerSettings, state_dir: Path
) -> Source:
    return module(stream.kind).source(stream, agent, peer, state_dir)


def build_target(stream: StreamSettings, agent: AgentSettings, state_dir: Path) -> Target:
    return module(stream.kind).target(stream, agent, state_dir)


def build_background(
    stream: StreamSettings, agent: AgentSettings, role: str, state_dir: Path
) -> list[Background]:
    make = getattr(module(stream.kind), "background", None)
    return [] if make is None else list(make(stream, agent, role, state_dir))
