"""The files of the mass-delete guard under a mirror target's state directory, and its gauge.

```
<target>/delete-guard.json     the guard's state (crash-safe, written by the target only):
                               the recent deletes (the window), and while deletes are held
                               the hold (id, since, reason, the deletes applied in the
                               window before it tripped) and the held deletes
                               {key, version, segment, position, held_at}, in stream order
<target>/delete-decision.json  an operator's decision, written atomically by
                               ``dragent objects deletes approve|reject``; the target
                               carries it out at its next step and removes it
<target>/deletes-rejected.json every rejected delete {key: {version, hold, rejected_at}}:
                               the verify reports those keys as accepted differences
```

``dragent_objects_deletes_held{stream}`` (the deletes held now) is computed at scrape
time from the live targets, which register here when created (held weakly).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from replicators import checkpoint

GUARD_FILE = "delete-guard.json"
DECISION_FILE = "delete-decision.json"
REJECTED_FILE = "deletes-rejected.json"
Decision = Literal["approve", "reject"]


def read_guard(state_dir: Path) -> dict[str, Any]:
    """The guard's state: ``{"window": [[t, key], ...], "hold": {...} | None, "held": [...]}``."""
    state = checkpoint.load(state_dir / GUARD_FILE) or {}
    state.setdefault("window", [])
    state.setdefault("hold", None)
    state.setdefault("held", [])
    return state


def write_guard(state_dir: Path, state: dict[str, Any]) -> None:
    checkpoint.save(state_dir / GUARD_FILE, state)


def request(state_dir: Path, decision: Decision, hold_id: str, by: str = "") -> dict[str, Any]:
    """Record an operator's decision on the hold ``hold_id`` (atomically: the target reads
    either no decision or this whole one)."""
    body = {"decision": decision, "hold": hold_id, "at": time.time(), "by": by}
    checkpoint.save(state_dir / DECISION_FILE, body)
    return body


def read_decision(state_dir: Path) -> dict[str, Any] | None:
    return checkpoint.load(state_dir / DECISION_FILE)


def clear_decision(state_dir: Path) -> None:
    (state_dir / DECISION_FILE).unlink(missing_ok=True)


def rejected(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Every rejected delete, by key (the newest rejection of a key wins)."""
    state = checkpoint.load(state_dir / REJECTED_FILE) or {}
    keys = state.get("keys", {})
    return keys if isinstance(keys, dict) else {}


def record_rejection(state_dir: Path, hold_id: str, deletes: list[dict[str, Any]]) -> None:
    keys = rejected(state_dir)
    now = time.time()
    for d in deletes:
        keys[d["key"]] = {"version": d["version"], "hold": hold_id, "rejected_at": now}
    checkpoint.save(state_dir / REJECTED_FILE, {"keys": keys})


# -- the gauge ----------------------------------------------------------------------------


class _Guarded(Protocol):
    stream: str
    closed: bool

    def held_count(self) -> int: ...


_TARGETS: weakref.WeakSet[Any] = weakref.WeakSet()


def track(target: _Guarded) -> None:
    _TARGETS.add(target)


class HeldCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        held = GaugeMetricFamily(
            "dragent_objects_deletes_held",
            "Passive side: deletes the mass-delete guard holds back from the mirror, "
            "awaiting an operator's decision (dragent objects deletes approve|reject).",
            labels=["stream"],
        )
        counts: dict[str, int] = {}
        for target in list(_TARGETS):
            if target.stream and not target.closed:
                counts[target.stream] = max(counts.get(target.stream, 0), target.held_count())
        for stream, count in sorted(counts.items()):
            held.add_metric([stream], float(count))
        yield held


COLLECTOR = HeldCollector()
