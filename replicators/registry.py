"""Stream kinds: one package per kind, laid out the same way, and this one registry.

A kind is a package ``replicators/<kind>/`` (``options``, ``source``, ``target``,
``verify``, and ``kind``: the module this registry imports). Its ``kind`` module is a
``Kind``: ``source``, ``target`` and, optionally, ``background``, ``verify`` and
``restore`` (see the protocol below). Adding a kind is that package and one line
here (``KIND_MODULES``), or ``register`` at run time; ``tests/test_new_kind.py``
proves it with a kind of its own, run through ship, apply, verify and restore.

Modules are imported when a configuration uses the kind, so a kind's
dependencies cost nothing to agents that do not run it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from replicators.settings import AgentSettings, PeerSettings, StreamSettings
    from replicators.stream import Source, Target

KIND_MODULES = {
    "synthetic": "replicators.synthetic.kind",
    "postgres": "replicators.postgres.kind",
    "objects": "replicators.objects.kind",
    "artifacts": "replicators.artifacts.kind",
}


class Kind(Protocol):
    """What a kind's ``kind`` module provides (functions at module level).

    - ``source(stream, agent, peer, state_dir) -> Source``: the active side's capture
      for one destination ``peer``; ``state_dir`` is private to that pair.
    - ``target(stream, agent, state_dir) -> Target``: the passive side's copy.
    - optional ``background(stream, agent, role, state_dir) -> list[Background]``:
      periodic jobs of the kind (a base-backup schedule, a reconcile scan), run by the
      same supervising loop as the streams.
    - optional ``verify(stream, agent, *, deep, repair) -> dict``: the unsigned report
      of an on-demand verification (``verifiers/report.py``).
    - optional ``restore(stream, agent, into, *, at) -> dict``: this region's vault
      (read with ``replicators.logread.LogWalk``) into ``into``, as of ``at``.

    ``stream``, ``agent`` and ``peer`` are read through ``replicators.settings``'s
    ``StreamSettings``, ``AgentSettings`` and ``PeerSettings``.
    """

    KIND: str

    def source(
        self, stream: StreamSettings, agent: AgentSettings, peer: PeerSettings, state_dir: Path
    ) -> Source: ...

    def target(self, stream: StreamSettings, agent: AgentSettings, state_dir: Path) -> Target: ...


def register(kind: str, module_name: str) -> None:
    """Make ``kind`` known, its ``Kind`` module importable as ``module_name``."""
    KIND_MODULES[kind] = module_name


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
