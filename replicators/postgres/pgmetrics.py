"""PostgreSQL-specific metrics, computed at scrape time from the live sources and monitors.

Exported (labels: stream, and slot or peer):

- ``dragent_pg_slot_retained_bytes``: WAL the primary keeps for our slot.
- ``dragent_pg_walsender_flush_lag_seconds`` / ``..._write_lag_seconds``:
  PostgreSQL's own view of our replication connection (``pg_stat_replication``),
  an independent check of ``dragent_rpo_seconds``: flush is reported only
  once WAL is durable in the vault.
- ``dragent_pg_lag_bytes{watermark}``: the primary's insert LSN minus the
  captured (received) and durable (acknowledged) positions.
- ``dragent_pg_standby_replay_lag_bytes`` / ``dragent_pg_standby_last_replay_age_seconds``:
  passive side, the spool's applied end minus the standby's replay LSN, and
  the age of the last transaction the standby replayed.
- ``dragent_pg_synchronous``: 1 while zero-loss mode is in force, 0 after a
  fallback to asynchronous.
- ``dragent_recovery_window_seconds`` / ``..._policy_seconds``: how far back a restore
  from this region's vault can reach (as of the last collection), and the policy;
  ``dragent_vault_bytes`` / ``dragent_vault_objects{kind}``: what the stream holds
  there; ``dragent_gc_locked_objects``: deletes Object Lock refused.

Objects register themselves here when created and are held weakly, so
nothing needs closing.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class _Source(Protocol):
    stream: str
    slot: str
    retained_bytes: int
    flush_lag: float | None
    write_lag: float | None

    def lag_bytes(self) -> dict[str, int]: ...


_SOURCES: weakref.WeakSet[_Source] = weakref.WeakSet()
_MONITORS: weakref.WeakSet[Any] = weakref.WeakSet()
_GUARDS: weakref.WeakSet[Any] = weakref.WeakSet()
_COLLECTORS: weakref.WeakSet[Any] = weakref.WeakSet()


def track_source(source: object) -> None:
    _SOURCES.add(source)


def track_monitor(monitor: object) -> None:
    _MONITORS.add(monitor)


def track_guard(guard: object) -> None:
    _GUARDS.add(guard)


def track_gc(collector: object) -> None:
    """A vault collector (``kind.VaultGc``): its ``policy`` and ``last`` pass."""
    _COLLECTORS.add(collector)


class PostgresCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        retained = GaugeMetricFamily(
            "dragent_pg_slot_retained_bytes",
            "WAL retained on the primary by the slot.",
            labels=["stream", "slot"],
        )
        flush = GaugeMetricFamily(
            "dragent_pg_walsender_flush_lag_seconds",
            "PostgreSQL's flush_lag of the slot's walsender (flush = durable in the vault).",
            labels=["stream", "slot"],
        )
        write = GaugeMetricFamily(
            "dragent_pg_walsender_write_lag_seconds",
            "PostgreSQL's write_lag of the slot's walsender (write = received by the agent).",
            labels=["stream", "slot"],
        )
        lag = GaugeMetricFamily(
            "dragent_pg_lag_bytes",
            "Primary insert LSN minus the watermark's LSN.",
            labels=["stream", "slot", "watermark"],
        )
        for s in list(_SOURCES):
            labels = [s.stream, s.slot]
            retained.add_metric(labels, float(s.retained_bytes))
            if s.flush_lag is not None:
                flush.add_metric(labels, float(s.flush_lag))
            if s.write_lag is not None:
                write.add_metric(labels, float(s.write_lag))
            for mark, value in s.lag_bytes().items():
                lag.add_metric([*labels, mark], float(value))
        replay_bytes = GaugeMetricFamily(
            "dragent_pg_standby_replay_lag_bytes",
            "Spool applied end minus the standby's replay LSN.",
            labels=["stream"],
        )
        replay_age = GaugeMetricFamily(
            "dragent_pg_standby_last_replay_age_seconds",
            "Now minus the commit time of the last transaction the standby replayed.",
            labels=["stream"],
        )
        now = time.time()
        for m in list(_MONITORS):
            if m.replay_lag_bytes is not None:
                replay_bytes.add_metric([m.stream], float(m.replay_lag_bytes))
            if m.last_replay_time is not None:
                replay_age.add_metric([m.stream], max(0.0, now - m.last_replay_time))
        sync = GaugeMetricFamily(
            "dragent_pg_synchronous",
            "1 while commits wait for the vault (zero-loss mode), 0 after a fallback.",
            labels=["stream", "slot"],
        )
        for g in list(_GUARDS):
            sync.add_metric([g.stream, g.slot], 1.0 if g.synchronous else 0.0)
        yield from (retained, flush, write, lag, replay_bytes, replay_age, sync)
        yield from _retention()


def _retention() -> Iterator[Metric]:
    window = GaugeMetricFamily(
        "dragent_recovery_window_seconds",
        "Now minus the oldest point a restore from this region's vault can reach (0: none).",
        labels=["stream"],
    )
    policy = GaugeMetricFamily(
        "dragent_recovery_window_policy_seconds",
        "The recovery window the retention policy promises (0: keep everything).",
        labels=["stream"],
    )
    size = GaugeMetricFamily(
        "dragent_vault_bytes", "Bytes the stream holds in this region's vault.",
        labels=["stream", "kind"],
    )  # fmt: skip
    count = GaugeMetricFamily(
        "dragent_vault_objects", "Objects the stream holds in this region's vault.",
        labels=["stream", "kind"],
    )  # fmt: skip
    history = GaugeMetricFamily(
        "dragent_vault_history_seconds",
        "Now minus the collector's first pass over this vault: a window shorter than the "
        "policy is a fault only once the history is longer than it.",
        labels=["stream"],
    )
    locked = GaugeMetricFamily(
        "dragent_gc_locked_objects",
        "Objects the last collection could not delete (Object Lock).",
        labels=["stream"],
    )
    now = time.time()
    for c in list(_COLLECTORS):
        stream = c.stream.name
        policy.add_metric([stream], float(c.policy.window))
        if c.first_seen is not None:
            history.add_metric([stream], max(0.0, now - c.first_seen))
        last = c.last
        if last is None:
            continue
        oldest = last.oldest_point
        window.add_metric([stream], max(0.0, now - oldest) if oldest else 0.0)
        locked.add_metric([stream], float(len(last.locked)))
        for kind, value in last.vault_bytes.items():
            size.add_metric([stream, kind], float(value))
        for kind, value in last.vault_objects.items():
            count.add_metric([stream, kind], float(value))
    yield from (window, policy, history, size, count, locked)


COLLECTOR = PostgresCollector()
