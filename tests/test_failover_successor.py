"""Choosing the successor among several passive regions: the most caught-up one takes
over, the others defer to it (``agent.coordination.successor`` and ``decide``)."""

from __future__ import annotations

from dataclasses import replace

from agent.coordination.decide import Observation, Rules, decide
from agent.coordination.successor import Standing, ahead, better, from_health
from replicators.postgres.guard import listed_slots, standby_names

RULES = Rules(automatic=True, fence_after=3.0, takeover_after=2.0, lockout=600.0, max_lag=5.0)
WALL = 1000.0
FRESH = 5.0


def st(region: str, position: int | None, at: float = WALL, **kw: object) -> Standing:
    return replace(Standing(region, "passive", position, None, at), **kw)  # type: ignore[arg-type]


def test_the_higher_position_is_ahead() -> None:
    assert ahead(st("c", 100), [st("b", 200)], WALL, FRESH, "a") == ("b",)
    assert ahead(st("b", 200), [st("c", 100)], WALL, FRESH, "a") == ()


def test_equal_positions_are_broken_by_applied_time_then_by_region_name() -> None:
    # the same WAL: the first name wins, so b takes over and c defers
    assert ahead(st("c", 100), [st("b", 100)], WALL, FRESH, "a") == ("b",)
    assert ahead(st("b", 100), [st("c", 100)], WALL, FRESH, "a") == ()
    # the same WAL but c applied later objects: c is ahead
    c_later = st("c", 100, applied_time=50.0)
    assert ahead(st("b", 100, applied_time=40.0), [c_later], WALL, FRESH, "a") == ("c",)


def test_a_known_position_beats_an_unknown_one() -> None:
    assert better(st("c", 0), st("b", None))
    assert ahead(st("b", None), [st("c", 5)], WALL, FRESH, "a") == ("c",)
    assert ahead(st("b", 5), [st("c", None)], WALL, FRESH, "a") == ()


def test_a_stale_standing_does_not_count() -> None:
    # c published it 6 s ago (its agent died since): b no longer waits for it
    assert ahead(st("b", 100), [st("c", 200, at=WALL - 6.0)], WALL, FRESH, "a") == ()
    assert ahead(st("b", 100), [st("c", 200, at=WALL - 4.0)], WALL, FRESH, "a") == ("c",)


def test_the_old_leader_and_active_regions_do_not_count() -> None:
    old = st("a", 900)
    assert ahead(st("b", 100), [old], WALL, FRESH, "a") == ()
    active = st("c", 900, role="active")
    assert ahead(st("b", 100), [active], WALL, FRESH, "a") == ()
    assert ahead(st("b", 100), [st("b", 900)], WALL, FRESH, "a") == ()


def test_exactly_one_live_passive_finds_nobody_ahead() -> None:
    regions = [st("b", 300), st("c", 300), st("d", 299, applied_time=99.0), st("e", 301)]
    free = [s.region for s in regions if not ahead(s, regions, WALL, FRESH, "a")]
    assert free == ["e"]
    # e dies: once its standing is stale, b (first of the equal best) is the one
    later = [replace(s, at=WALL - 10.0) if s.region == "e" else s for s in regions]
    free = [s.region for s in later if s.region != "e" and not ahead(s, later, WALL, FRESH, "a")]
    assert free == ["b"]


def test_from_health_reads_the_published_standing() -> None:
    health = {"at": 5.0, "role": "passive", "standing": st("c", 42, at=5.0).public()}
    assert from_health("c", health) == st("c", 42, at=5.0)
    assert from_health("c", {"at": 5.0}) is None
    assert from_health("c", None) is None
    assert from_health("c", {"standing": {"position": "x"}}) is None


def obs(**kw: object) -> Observation:
    base = Observation(
        region="c",
        now=100.0,
        wall=WALL,
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


def test_a_passive_defers_the_takeover_to_a_more_caught_up_one() -> None:
    d = decide(obs(ahead=("b",)), RULES)
    assert d.kinds() == [] and d.role == "passive"
    assert "deferring the takeover to b" in d.summary
    # nobody ahead: the usual takeover
    assert decide(obs(), RULES).kinds() == ["takeover"]


def test_deferring_never_skips_the_other_gates() -> None:
    # the old leader still answers: no failover at all, whoever is ahead
    assert "answers probes" in decide(obs(peer_down_since=None, ahead=("b",)), RULES).summary
    # the lease holder is unaffected
    assert decide(obs(leader="b", ahead=("b",)), RULES).kinds() == []
    # a region reclaiming its own expired lease is not a takeover
    assert decide(obs(region="a", ahead=("b",)), RULES).kinds() == ["acquire"]


def test_the_synchronous_list_names_every_destination_and_waits_for_all() -> None:
    # each destination's guard adds or removes only its own slot; a commit waits for all
    assert standby_names({"dragent_b"}) == '"dragent_b"'
    both = standby_names({"dragent_c", "dragent_b"})
    assert both == 'ANY 2 ("dragent_b", "dragent_c")'
    assert listed_slots(both) == {"dragent_b", "dragent_c"}
    assert listed_slots(standby_names(listed_slots(both) - {"dragent_c"})) == {"dragent_b"}
    assert standby_names(set()) == ""
    assert listed_slots("") == set() and listed_slots("*") == set()
    assert listed_slots('FIRST 1 (s1, "S2")') == {"s1", "S2"}
