"""The failover decision, as a pure function of what one agent observes.

``decide(observation, rules)`` returns the role this region should have and
the actions to take now. No I/O, no clock: time is passed in (``now`` on the
monotonic clock for durations measured locally, ``wall`` for records shared
through etcd). The coordinator calls it once per cycle and executes the
actions in order.

The safety argument, in the order the rules are checked:

1. A region writes only while it holds the leader lease (the leader key in
   etcd is attached to its lease and names it). If it has not renewed for
   ``fence_after`` (< the lease TTL), it fences its own database *before* etcd
   can let the lease expire; it unfences only after a renewal succeeds while
   the key still names it, and never a fence someone else set while automation
   is paused (a switchover fences the old primary, then waits for the standby,
   then moves the lease: the old holder renews meanwhile).
2. A region takes the lease only in an etcd transaction that requires the
   leader key to be absent and the epoch to be the one it observed, and that
   bumps the epoch: two regions can never both acquire, and every acquisition
   has a fresh fencing token.
3. A passive region takes over only when the lease is gone *and* its own
   probes of the last leader's region have failed for ``takeover_after``, the
   automation is not paused, the last failover is older than ``lockout``, and
   its lag is within ``max_lag``; otherwise it waits or pages a human.
   With several passive regions, it also defers while another live passive
   region is more caught up (``ahead``, computed by ``agent.coordination.
   successor`` from what each region publishes in etcd): the most caught-up
   one takes over, the others then follow it.
4. Without an etcd answer nothing is acquired: a minority side never acts.
5. A region that is not the leader keeps its database fenced (a standby is
   read-only anyway; an old primary coming back stays read-only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["active", "passive"]


@dataclass(frozen=True)
class Rules:
    automatic: bool
    fence_after: float
    takeover_after: float
    lockout: float
    max_lag: float


@dataclass(frozen=True)
class Observation:
    """What one agent knows at one instant.

    ``etcd_ok``: the last read of the coordination keys succeeded (so
    ``leader``, ``epoch``, ``last_leader``, ``paused``, ``last_failover`` are
    current). ``holding``: this process holds a lease it acquired or adopted;
    ``renewed_at``: monotonic time at which the last successful renewal was
    *sent*. ``peer_down_since``: monotonic time since which every probe of the
    last leader's region has failed (None while it answers).
    """

    region: str
    now: float
    wall: float
    etcd_ok: bool
    leader: str | None
    epoch: int
    last_leader: str | None
    holding: bool
    renewed_at: float | None
    fenced: bool
    bootstrap_active: bool
    paused: bool = False
    last_failover: float | None = None
    peer_down_since: float | None = None
    lag: float | None = None
    fence_external: bool = False
    """The database is fenced and this process did not fence it (a switchover in progress,
    an operator, an earlier process)."""
    ahead: tuple[str, ...] = ()
    """Live passive regions more caught up than this one (``successor.ahead``): a takeover
    is theirs."""


@dataclass(frozen=True)
class Action:
    """One step for the coordinator: ``kind`` names it, ``reason`` explains it."""

    kind: Literal["renew", "fence", "unfence", "acquire", "adopt", "takeover", "release", "page"]
    reason: str = ""
    expect_epoch: int = 0


@dataclass(frozen=True)
class Decision:
    role: Role
    actions: tuple[Action, ...]
    summary: str

    def kinds(self) -> list[str]:
        return [a.kind for a in self.actions]


def decide(o: Observation, r: Rules) -> Decision:
    """The role and actions for this cycle (see the module docstring for the rules)."""
    if o.holding:
        return _as_holder(o, r)
    return _as_follower(o, r)


def _as_holder(o: Observation, r: Rules) -> Decision:
    silent = o.now - o.renewed_at if o.renewed_at is not None else float("inf")
    if o.etcd_ok and o.leader == o.region:
        if o.fenced and o.fence_external and o.paused:
            # a switchover fenced this primary and is waiting for the standby: lifting the
            # fence would let writes in that the new primary never sees
            why = "leader, fenced by someone else while automation is paused (a switchover?)"
            return Decision("active", (Action("renew"),), why)
        acts = (Action("renew"),) + ((Action("unfence", "lease renewed"),) if o.fenced else ())
        return Decision("active", acts, "leader: lease renewed")
    if o.etcd_ok:
        why = f"lost the lease (leader is {o.leader or 'nobody'})"
        return Decision("passive", (*_fence(o, why), Action("release", why)), why)
    if silent >= r.fence_after:
        why = f"no renewal for {silent:.1f}s (fence_after {r.fence_after:g}s)"
        return Decision("active", (*_fence(o, why), Action("renew")), f"leader, fenced: {why}")
    return Decision("active", (Action("renew"),), f"leader: etcd unanswered for {silent:.1f}s")


def _fence(o: Observation, why: str) -> tuple[Action, ...]:
    return () if o.fenced else (Action("fence", why),)


def _as_follower(o: Observation, r: Rules) -> Decision:
    if not o.etcd_ok:
        return _wait("etcd unreachable: never act without a quorum")
    if o.leader == o.region:
        return Decision("active", (Action("adopt", "the leader key names this region"),), "adopt")
    if o.leader is not None:
        why = f"following {o.leader} (epoch {o.epoch})"
        return Decision("passive", _fence(o, why), why)
    if o.epoch == 0:
        if o.bootstrap_active:
            return Decision("passive", (Action("acquire", "bootstrap", 0),), "bootstrap")
        return _wait("no leader yet: waiting for the bootstrap region")
    if o.last_leader == o.region:
        why = "this region was the last leader: reclaiming the lease"
        return Decision("passive", (Action("acquire", why, o.epoch),), why)
    decision = _takeover_or_wait(o, r)
    if decision.kinds() == ["takeover"]:
        return decision
    return Decision("passive", _fence(o, decision.summary) + decision.actions, decision.summary)


def _takeover_or_wait(o: Observation, r: Rules) -> Decision:
    gone = f"lease of {o.last_leader} expired"
    if o.peer_down_since is None:
        return _wait(f"{gone} but {o.last_leader} answers probes: no failover")
    down = o.now - o.peer_down_since
    if down < r.takeover_after:
        return _wait(f"{gone}; {o.last_leader} down for {down:.1f}s of {r.takeover_after:g}s")
    if o.ahead:
        more = ", ".join(o.ahead)
        return _wait(f"{gone}; deferring the takeover to {more}: more caught up than this region")
    if o.paused:
        return _page(f"{gone} and {o.last_leader} is down, but automation is paused")
    if not r.automatic:
        return _page(f"{gone} and {o.last_leader} is down; automatic failover is off")
    if o.last_failover is not None and o.wall - o.last_failover < r.lockout:
        ago = o.wall - o.last_failover
        return _page(f"{gone}; last failover {ago:.0f}s ago, within the {r.lockout:g}s lockout")
    if o.lag is None or o.lag > r.max_lag:
        lag = "unknown" if o.lag is None else f"{o.lag:.1f}s"
        return _page(f"{gone}; lag {lag} exceeds max_lag {r.max_lag:g}s: promotion refused")
    why = f"{gone} and {o.last_leader} down for {down:.1f}s"
    return Decision("passive", (Action("takeover", why, o.epoch),), why)


def _wait(why: str) -> Decision:
    return Decision("passive", (), why)


def _page(why: str) -> Decision:
    return Decision("passive", (Action("page", why),), why)
