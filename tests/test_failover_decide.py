"""The pure failover decision: every branch, and partitions replayed as timelines."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.coordination.decide import Observation, Rules, decide

RULES = Rules(automatic=True, fence_after=3.0, takeover_after=2.0, lockout=600.0, max_lag=5.0)


def obs(**kw: object) -> Observation:
    base = Observation(
        region="b",
        now=100.0,
        wall=1000.0,
        etcd_ok=True,
        leader=None,
        epoch=1,
        last_leader="a",
        holding=False,
        renewed_at=None,
        fenced=True,
        bootstrap_active=False,
        peer_down_since=90.0,
        lag=0.5,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def holder(**kw: object) -> Observation:
    base = obs(region="a", leader="a", holding=True, renewed_at=99.5, fenced=False)
    return replace(base, **kw)  # type: ignore[arg-type]


def test_holder_renews_and_unfences_after_a_renewal() -> None:
    assert decide(holder(), RULES).kinds() == ["renew"]
    d = decide(holder(fenced=True), RULES)
    assert d.kinds() == ["renew", "unfence"] and d.role == "active"


def test_holder_keeps_trying_before_fence_after() -> None:
    d = decide(holder(etcd_ok=False, renewed_at=98.0), RULES)
    assert d.kinds() == ["renew"]


def test_holder_fences_once_after_fence_after() -> None:
    d = decide(holder(etcd_ok=False, renewed_at=97.0), RULES)
    assert d.kinds() == ["fence", "renew"]
    assert decide(holder(etcd_ok=False, renewed_at=90.0, fenced=True), RULES).kinds() == ["renew"]


@pytest.mark.parametrize("leader", [None, "b"])
def test_holder_that_lost_the_key_fences_and_releases(leader: str | None) -> None:
    d = decide(holder(leader=leader), RULES)
    assert d.kinds() == ["fence", "release"] and d.role == "passive"


def test_follower_never_acts_without_etcd() -> None:
    d = decide(obs(etcd_ok=False, peer_down_since=0.0), RULES)
    assert d.kinds() == [] and d.role == "passive"


def test_follower_follows_a_leader() -> None:
    assert decide(obs(leader="a"), RULES).kinds() == []


def test_a_follower_keeps_its_database_fenced() -> None:
    assert decide(obs(leader="a", fenced=False), RULES).kinds() == ["fence"]
    assert decide(obs(peer_down_since=None, fenced=False), RULES).kinds() == ["fence"]
    # a takeover promotes and unfences: no fence first
    assert decide(obs(fenced=False), RULES).kinds() == ["takeover"]
    # nor before a bootstrap or reclaiming its own expired lease
    assert decide(obs(region="a", fenced=False), RULES).kinds() == ["acquire"]


def test_adopts_its_own_leader_key_after_a_restart() -> None:
    d = decide(obs(region="a", leader="a"), RULES)
    assert d.kinds() == ["adopt"] and d.role == "active"


def test_bootstrap_only_by_the_configured_active_region() -> None:
    assert decide(obs(epoch=0, last_leader=None), RULES).kinds() == []
    d = decide(
        obs(region="a", epoch=0, last_leader=None, bootstrap_active=True, fenced=False), RULES
    )
    assert d.kinds() == ["acquire"] and d.actions[0].expect_epoch == 0


def test_last_leader_reclaims_an_expired_lease() -> None:
    d = decide(obs(region="a", last_leader="a", epoch=4), RULES)
    assert d.kinds() == ["acquire"] and d.actions[0].expect_epoch == 4


def test_takeover_when_lease_gone_and_peer_down_long_enough() -> None:
    d = decide(obs(epoch=3), RULES)
    assert d.kinds() == ["takeover"] and d.actions[0].expect_epoch == 3


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"peer_down_since": None}, []),
        ({"peer_down_since": 99.0}, []),
        ({"paused": True}, ["page"]),
        ({"last_failover": 900.0}, ["page"]),
        ({"lag": 9.0}, ["page"]),
        ({"lag": None}, ["page"]),
    ],
)
def test_takeover_guard_rails(change: dict[str, object], expect: list[str]) -> None:
    assert decide(obs(**change), RULES).kinds() == expect


def test_no_takeover_when_automation_is_off() -> None:
    assert decide(obs(), replace(RULES, automatic=False)).kinds() == ["page"]


def test_lockout_expires() -> None:
    assert decide(obs(last_failover=300.0), RULES).kinds() == ["takeover"]


def _timeline(
    a_sees_etcd: bool, b_sees_a: bool, lease_ttl: float = 5.0, step: float = 0.5
) -> list[tuple[float, str, list[str], list[str]]]:
    """Replay a partition starting at t=0 with a holding the lease (renewed at 0).

    etcd (with the witness) lets a's lease expire ``lease_ttl`` after its last
    renewal; a renews only while it reaches etcd. Returns (t, a_role, a_actions,
    b_actions) per step.
    """
    out = []
    renewed, fenced, holding = 0.0, False, True
    b_down_since: float | None = None
    leader: str | None = "a"
    t = 0.0
    while t <= 12.0:
        if not a_sees_etcd and t - renewed >= lease_ttl:
            leader = None
        a = Observation(
            region="a",
            now=t,
            wall=t,
            etcd_ok=a_sees_etcd,
            leader=leader,
            epoch=1,
            last_leader="a",
            holding=holding,
            renewed_at=renewed,
            fenced=fenced,
            bootstrap_active=True,
        )
        da = decide(a, RULES)
        if "fence" in da.kinds():
            fenced = True
        if a_sees_etcd and "renew" in da.kinds():
            renewed = t
        if not b_sees_a and b_down_since is None:
            b_down_since = t
        b = obs(now=t, wall=t, leader=leader, peer_down_since=b_down_since, epoch=1)
        db = decide(b, RULES)
        if "takeover" in db.kinds():
            leader = "b"
        out.append((t, "fenced" if fenced else da.role, da.kinds(), db.kinds()))
        t += step
    return out


def test_partition_a_isolated_fences_before_b_takes_over() -> None:
    steps = _timeline(a_sees_etcd=False, b_sees_a=False)
    fenced_at = min(t for t, role, _, _ in steps if role == "fenced")
    takeover_at = min(t for t, _, _, b in steps if "takeover" in b)
    assert fenced_at == 3.0  # fence_after
    assert takeover_at >= 5.0  # only after the lease expired
    assert fenced_at < takeover_at


def test_partition_only_a_b_link_no_failover_no_flapping() -> None:
    steps = _timeline(a_sees_etcd=True, b_sees_a=False)
    assert all(role == "active" and a == ["renew"] for _, role, a, _ in steps)
    assert all(b == [] for *_, b in steps)


def test_holder_leaves_a_switchovers_fence_alone_while_automation_is_paused() -> None:
    """A switchover fences the old primary, waits for the standby, then moves the lease;
    the old holder renews meanwhile and must not lift that fence (writes acknowledged
    then would never reach the new primary)."""
    during = holder(fenced=True, fence_external=True, paused=True)
    assert decide(during, RULES).kinds() == ["renew"]
    assert decide(during, RULES).role == "active"
    # its own fence (after a silence) is lifted once renewed, paused or not
    assert decide(holder(fenced=True, paused=True), RULES).kinds() == ["renew", "unfence"]
    # and someone else's once automation runs again (a refused switchover, an operator)
    assert decide(holder(fenced=True, fence_external=True), RULES).kinds() == ["renew", "unfence"]
