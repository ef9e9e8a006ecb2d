"""Which passive region takes over: the most caught-up one. Pure, no I/O, no clock.

With two or more passive regions, the one that takes over must be the one
holding the most of the old active region's WAL: a passive region that
promotes behind another one forks the history there, and the region ahead of
it cannot follow the new timeline (its standby replayed past the fork) and
loses what the others never had.

Every passive region publishes its ``Standing`` in etcd (``health/<region>``,
``standing`` field, every probe interval): its ``position``, the end of the
PostgreSQL WAL it has applied (the sink's applied watermark of the ``postgres``
stream, else the standby's replay LSN), and the latest source time applied by
any other stream. ``ahead(me, others, wall, fresh)`` names the live passive
regions more caught up than this one; ``decide`` defers a takeover while that
list is not empty. The rule, in order:

1. only a standing published within ``fresh`` seconds counts (a region whose
   agent died stops publishing and drops out after ``fresh``);
2. only passive regions count, and never the region whose lease expired;
3. a higher PostgreSQL position is more caught up; a region that knows its
   position beats one that does not;
4. at equal positions, a later applied source time of the other streams;
5. at equal standings, the region whose name sorts first.

So exactly one live passive region finds nobody ahead of it, and the others
wait for it: if it cannot take over (a guard refuses, it dies), the others
wait until its standing is ``fresh`` seconds old and then go on without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Standing:
    """How caught up one region is, as it published it."""

    region: str
    role: str = "passive"
    position: int | None = None
    """The end of the PostgreSQL WAL applied in this region (an LSN as an integer)."""
    applied_time: float | None = None
    """The latest source time applied by any other stream (objects, artifacts)."""
    at: float = 0.0
    """Wall-clock time of publication."""

    def key(self) -> tuple[int, float, int, float]:
        """The sort key, larger is more caught up (the region name breaks ties apart)."""
        known = 0 if self.position is None else 1
        return (known, float(self.position or 0), 1, self.applied_time or 0.0)

    def public(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "position": self.position,
            "applied_time": self.applied_time,
            "at": self.at,
        }


def from_health(region: str, health: Mapping[str, Any] | None) -> Standing | None:
    """The standing a region published in its health record (None without one)."""
    if not health or not isinstance(health.get("standing"), Mapping):
        return None
    raw = health["standing"]
    try:
        position = None if raw.get("position") is None else int(raw["position"])
        applied = None if raw.get("applied_time") is None else float(raw["applied_time"])
        at = float(raw.get("at", health.get("at", 0.0)))
    except (TypeError, ValueError):
        return None
    return Standing(region, str(raw.get("role", health.get("role", ""))), position, applied, at)


def better(x: Standing, y: Standing) -> bool:
    """True if ``x`` is more caught up than ``y`` (rules 3-5)."""
    if x.key() != y.key():
        return x.key() > y.key()
    return x.region < y.region


def ahead(
    me: Standing, others: Iterable[Standing], wall: float, fresh: float, old: str | None = None
) -> tuple[str, ...]:
    """The regions among ``others`` that are live passives more caught up than ``me``,
    in region order (rules 1-5). ``old``: the region whose lease expired."""
    out = [
        o.region
        for o in others
        if o.region not in (me.region, old)
        and o.role == "passive"
        and wall - o.at <= fresh
        and better(o, me)
    ]
    return tuple(sorted(out))
