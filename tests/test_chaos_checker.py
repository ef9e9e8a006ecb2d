"""The chaos checker, schedule, history file and timeline: hand-built histories, no lab."""

from __future__ import annotations

import itertools
import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.chaos.checker import check
from agent.chaos.history import HISTORY_VERSION, History, read_history
from agent.chaos.schedule import FAULTS, HEAL_MARGIN, plan
from agent.chaos.timeline import render
from tests.test_statuspage import CHROMIUM_FLAGS

# -- building histories ----------------------------------------------------------------------


def start(**fields: Any) -> dict[str, Any]:
    base = {"seed": 7, "minutes": 1, "sync": False, "faults": ["kill"], "rpo_target": 5.0}
    return {"type": "start", "t": 0.0, "version": HISTORY_VERSION, **base, **fields}


def write(id: int, t: float, region: str | None, epoch: int | None, client: str = "dns") -> dict:
    return {"type": "write", "t": t, "client": client, "id": id, "invoked": t - 0.01, "ok": True}


def ack(id: int, t: float, region: str, epoch: int, client: str = "dns") -> dict[str, Any]:
    return write(id, t, region, epoch, client) | {"region": region, "epoch": epoch}


def failed(id: int, t: float, client: str = "dns") -> dict[str, Any]:
    w = write(id, t, None, None, client)
    return w | {"ok": False, "region": None, "epoch": None, "error": "connection refused"}


def final(present: list[int], epoch: int, primary: str = "b", t: float = 100.0) -> dict:
    return {"type": "final", "t": t, "primary": primary, "present": present, "epoch": epoch}


def failover(lost_from: int, **start_fields: Any) -> list[dict[str, Any]]:
    """a acks ids 1..10 at t=1..10 under epoch 1; b takes over at epoch 2 (ids 11..15,
    t=20..24); ids lost_from..10 never reached b."""
    a = [ack(i, float(i), "a", 1) for i in range(1, 11)]
    b = [ack(10 + i, 19.0 + i, "b", 2) for i in range(1, 6)]
    present = [i for i in range(1, 16) if not lost_from <= i <= 10]
    return [start(**start_fields), *a, *b, final(present, epoch=2)]


# -- lost writes -----------------------------------------------------------------------------


def test_a_run_without_loss_is_ok() -> None:
    events = [start(), *(ack(i, float(i), "a", 1) for i in range(1, 6)), failed(6, 6.5)]
    verdict = check([*events, final([1, 2, 3, 4, 5], epoch=1, primary="a")])
    assert verdict["ok"] and verdict["lost_ok"] and verdict["lost"] == []
    assert verdict["writes"] == {"acknowledged": 5, "failed": 1}
    assert verdict["rpo"] == {"reported_max": 0.0, "true_max": 0.0, "under_reported": []}


def test_a_loss_within_the_final_epoch_is_never_ok() -> None:
    events = [start(), *(ack(i, float(i), "a", 1) for i in range(1, 6))]
    verdict = check([*events, final([1, 2, 4, 5], epoch=1, primary="a")])
    assert verdict["lost"] == [{"id": 3, "client": "dns", "region": "a", "epoch": 1, "age": 2.0}]
    assert not verdict["lost_ok"] and not verdict["ok"]


def test_a_loss_across_a_failover_within_the_rpo_target_is_ok() -> None:
    verdict = check(failover(lost_from=8))  # ids 8, 9, 10: 2, 1 and 0 s behind a's last ack
    assert [(loss["id"], loss["age"]) for loss in verdict["lost"]] == [
        (8, 2.0),
        (9, 1.0),
        (10, 0.0),
    ]
    assert verdict["lost_ok"] and verdict["ok"]
    assert verdict["rpo"]["true_max"] == 2.0


def test_a_loss_across_a_failover_over_the_rpo_target_is_not_ok() -> None:
    verdict = check(failover(lost_from=3))  # id 3 is 7 s behind, the target 5 s
    assert verdict["rpo"]["true_max"] == 7.0
    assert not verdict["lost_ok"] and not verdict["ok"]
    assert check(failover(lost_from=3, rpo_target=7.0))["lost_ok"]


def test_sync_mode_allows_no_loss_at_all() -> None:
    assert not check(failover(lost_from=10, sync=True))["ok"]  # 0 s behind, still a loss
    assert check(failover(lost_from=11, sync=True))["ok"]


def test_without_a_final_line_every_acknowledged_write_is_lost() -> None:
    verdict = check([start(), ack(1, 1.0, "a", 1), ack(2, 2.0, "a", 1)])
    assert [loss["id"] for loss in verdict["lost"]] == [1, 2] and not verdict["ok"]


def test_a_history_without_start_is_refused() -> None:
    with pytest.raises(ValueError, match="start"):
        check([ack(1, 1.0, "a", 1)])


# -- split brain -----------------------------------------------------------------------------


def test_a_stale_region_acknowledging_after_the_new_epoch_began_is_a_split_brain() -> None:
    b = [ack(100 + i, 10.0 + i, "b", 2, client="direct-b") for i in range(11)]  # t 10..20
    a = [ack(i, 5.0 + i, "a", 1, client="direct-a") for i in range(11)]  # t 5..15
    present = [w["id"] for w in a + b]
    verdict = check([start(), *a, *b, final(present, epoch=2)])
    assert verdict["split_brain"] == [{"a": ["a", 1, 5.0, 15.0], "b": ["b", 2, 10.0, 20.0]}]
    assert not verdict["split_brain_ok"] and not verdict["ok"]


def test_a_clean_failover_and_a_region_changing_epoch_are_not_split_brains() -> None:
    verdict = check(failover(lost_from=11))  # a: 1..10, b: 20..24
    assert verdict["split_brain"] == [] and verdict["split_brain_ok"] and verdict["ok"]
    same_region = [start(), ack(1, 1.0, "a", 1), ack(2, 3.0, "a", 1), ack(3, 2.0, "a", 2)]
    assert check([*same_region, final([1, 2, 3], epoch=2)])["split_brain_ok"]


def test_a_single_ack_inside_the_other_regions_interval_is_a_split_brain() -> None:
    events = [start(), ack(1, 1.0, "a", 1), ack(2, 9.0, "a", 1), ack(3, 5.0, "b", 2)]
    verdict = check([*events, final([1, 2, 3], epoch=2)])
    assert verdict["split_brain"] == [{"a": ["a", 1, 1.0, 9.0], "b": ["b", 2, 5.0, 5.0]}]


# -- mirror, vault, rpo, faults, rto -----------------------------------------------------------


def clean(*extra: dict[str, Any]) -> dict[str, Any]:
    return check([start(), ack(1, 1.0, "a", 1), *extra, final([1], epoch=1, primary="a")])


def test_mirror_and_vault_lines_decide_their_flags() -> None:
    assert clean()["mirror_ok"] and clean()["vault_ok"]  # no lines: nothing to fault
    assert clean({"type": "mirror", "t": 50, "equal": True, "differences": []})["ok"]
    unequal = clean({"type": "mirror", "t": 50, "equal": False, "differences": ["k1"]})
    assert not unequal["mirror_ok"] and not unequal["ok"]
    vault = {"type": "vault", "t": 60, "ok": True, "problem": None, "corrupted": ["s/1"]}
    assert clean(vault | {"applied_corrupted": []})["vault_ok"]  # flipped, and refused
    applied = clean(vault | {"applied_corrupted": ["s/1"]})
    assert not applied["vault_ok"] and not applied["ok"]
    assert not clean(vault | {"ok": False, "problem": "bad root", "applied_corrupted": []})["ok"]
    named = vault | {"ok": False, "problem": "bad root", "applied_corrupted": []}
    assert clean(named | {"damaged": ["s/1"]})["vault_ok"]  # names exactly what was flipped
    assert not clean(named | {"damaged": ["s/1", "s/2"]})["vault_ok"]  # and something else


def rpo(t: float, region: str, value: float) -> dict[str, Any]:
    return {"type": "rpo", "t": t, "region": region, "stream": "postgres", "rpo": value}


def test_a_gauge_that_read_lower_than_the_loss_is_under_reported() -> None:
    events = failover(lost_from=7)  # loss age 3 s; a's last ack at t=10
    low = [rpo(-0.5, "a", 9.0), rpo(5.0, "a", 1.0), rpo(9.0, "a", 2.5), rpo(9.5, "b", 2.0)]
    low.append(rpo(12.0, "b", 9.0))  # after the last ack
    verdict = check([*events[:-1], *low, events[-1]])  # too old or too late: not counted
    under = [{"region": "a", "epoch": 1, "loss_age": 3.0, "reported": 2.5}]
    assert verdict["rpo"] == {"reported_max": 9.0, "true_max": 3.0, "under_reported": under}
    assert verdict["ok"]  # an under-reported gauge is reported, not a failed run
    for region in ("a", "b"):  # the old active's RPO or its peer's replay lag
        honest = check([*events[:-1], rpo(8.0, region, 3.5), events[-1]])
        assert honest["rpo"]["under_reported"] == []
    silent = check(events)  # no sample at all: nothing warned of the loss
    assert silent["rpo"]["under_reported"][0]["reported"] is None


def test_faults_are_counted_by_name_including_enabled_ones_never_injected() -> None:
    fault = {"type": "fault", "t": 2.0, "target": "a", "until": 5.0, "detail": ""}
    events = [fault | {"fault": "kill"}, fault | {"fault": "kill"}, fault | {"fault": "partition"}]
    verdict = check([start(faults=["kill", "flip-byte"]), *events, final([], epoch=1)])
    assert verdict["faults"] == {"kill": 2, "flip-byte": 0, "partition": 1}


def test_rto_max_is_the_longest_gap_between_the_dns_clients_acknowledged_writes() -> None:
    dns = [ack(i, t, "a", 1) for i, t in enumerate([1.0, 2.0, 3.0, 10.5, 11.0])]
    direct = [ack(10, 3.0, "a", 1, client="direct-a"), ack(11, 30.0, "a", 1, client="direct-a")]
    events = [start(), *dns, failed(12, 6.0), *direct, final(list(range(12)), epoch=1)]
    assert check(events)["rto_max"] == 7.5
    assert check([start(), ack(1, 1.0, "a", 1), final([1], epoch=1)])["rto_max"] == 0.0


# -- schedule --------------------------------------------------------------------------------

TARGETS = {name: ["a", "b"] for name in FAULTS}


def test_the_same_seed_plans_the_same_schedule() -> None:
    first = plan(42, 600, list(FAULTS), TARGETS)
    assert first == plan(42, 600, list(FAULTS), TARGETS)
    assert first != plan(43, 600, list(FAULTS), TARGETS)
    assert len(first) > 10 and {f.name for f in first} <= set(FAULTS)


@pytest.mark.parametrize("seed", range(20))
def test_faults_never_overlap_and_heal_before_the_margin(seed: int) -> None:
    targets = {"kill": ["a"], "partition": ["a-b", "b-etcd"]}
    schedule = plan(seed, 300, ["kill", "partition"], targets, gap=(1.0, 4.0))
    assert schedule and schedule[0].at >= 1.0
    for before, after in itertools.pairwise(schedule):
        assert after.at >= before.until + 1.0
    assert all(f.until < 300 - HEAL_MARGIN and 3.0 <= f.duration <= 15.0 for f in schedule)
    assert all(f.target in targets[f.name] for f in schedule)


def test_plan_refuses_unknown_or_untargeted_faults() -> None:
    assert plan(1, 600, [], {}) == []
    assert plan(1, 20, ["kill"], TARGETS) == []  # too short to heal anything in time
    with pytest.raises(ValueError, match="unknown"):
        plan(1, 600, ["meteor"], TARGETS)
    with pytest.raises(ValueError, match="no targets"):
        plan(1, 600, ["kill"], {"kill": []})
    with pytest.raises(ValueError, match="positive"):
        plan(1, 600, ["kill"], TARGETS, gap=(0.0, 1.0))


# -- the history file ------------------------------------------------------------------------


def test_history_lines_round_trip_with_a_stamped_time(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    with History(path, clock=lambda: 123.5) as history:
        history.write(start())
        assert history.write({"type": "end"}) == {"type": "end", "t": 123.5}
    assert read_history(path) == [start(), {"type": "end", "t": 123.5}]


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ([json.dumps(start()), '{"type": "end", "t": 1}', '{"type": "wri'], "line 3: not JSON"),
        ([json.dumps(start()), "[1, 2]"], "line 2: not a JSON object"),
        ([json.dumps(start()), '{"t": 1}'], 'line 2: no "type"'),
        ([json.dumps(start()), '{"type": "end"}'], 'line 2: no numeric "t"'),
        ([json.dumps({k: v for k, v in start().items() if k != "version"})], 'no "version"'),
        ([json.dumps(start(version=2))], "line 1: unknown version 2"),
        (['{"type": "end", "t": 1}'], 'line 1: expected type "start"'),
        ([], "empty"),
    ],
)
def test_read_history_refuses_a_bad_line(tmp_path: Path, lines: list[str], problem: str) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError, match=problem):
        read_history(path)


# -- the timeline ----------------------------------------------------------------------------


def run_history() -> list[dict[str, Any]]:
    """A failover from eu-west to us-east during a one-way partition, one hostile client name."""
    events = failover(lost_from=9, faults=["partition-one-way", "kill"])
    for e in events:
        if e.get("region") in ("a", "b"):
            e["region"] = {"a": "eu-west", "b": "us-east"}[e["region"]]
    states = [
        {"type": "state", "t": 0.5, "region": "eu-west", "role": "active", "epoch": 1},
        {"type": "state", "t": 0.5, "region": "us-east", "role": "passive", "epoch": 1},
        {"type": "state", "t": 12.0, "region": "eu-west", "role": "active", "epoch": 1},
        {"type": "state", "t": 18.0, "region": "us-east", "role": "active", "epoch": 2},
    ]
    fenced = {"type": "state", "t": 14.0, "region": "eu-west", "role": "passive", "epoch": 1}
    fault = {"type": "fault", "t": 11.0, "fault": "partition-one-way", "target": "eu-west"}
    nemesis = [fault | {"until": 16.0, "detail": "<script>alert(1)</script>"}]
    nemesis.append({"type": "heal", "t": 16.0, "fault": "partition-one-way", "target": "eu-west"})
    samples = [rpo(t / 2, "eu-west", 0.2 + (t % 5) / 10) for t in range(2, 44)]
    samples += [rpo(t / 2, "us-east", 0.1 + (t % 3) / 10) for t in range(36, 50)]
    hostile = ack(99, 22.5, "us-east", 2, client="<script>x</script>")
    extra = [*states, fenced | {"fenced": True}, *nemesis, *samples, hostile]
    return [*sorted([*events[:-1], *extra], key=lambda e: e["t"]), events[-1]]


def test_the_timeline_shows_regions_faults_and_the_verdict_with_every_string_escaped() -> None:
    events = run_history()
    verdict = check(events)
    assert not verdict["ok"]  # the hostile client's write 99 is not in final.present
    page = render(events, verdict)
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert "eu-west" in page and "us-east" in page and "partition-one-way" in page
    assert "FAILED" in page and "active e2" in page and "fenced" in page
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<polyline" in page and 'stroke="#c62828"' in page  # RPO lines, lost-write marks
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "OK" in render(*(lambda e: (e, check(e)))(failover(lost_from=11)))


def test_a_heal_all_ends_every_open_fault_on_the_timeline() -> None:
    fault = {"type": "fault", "until": 9.0, "detail": "d"}
    events = [
        start(faults=["kill", "slow-link"]),
        fault | {"t": 1.0, "fault": "kill", "target": "a"},
        fault | {"t": 2.0, "fault": "slow-link", "target": "a-b"},
        {"type": "heal", "t": 6.0, "fault": "all", "target": "all"},
        {"type": "end", "t": 20.0},
    ]
    page = render(events, check(events))
    assert "kill a d (5.0s)" in page and "slow-link a-b d (4.0s)" in page


def test_the_timeline_renders_in_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (deploy/lab/install-system-deps.sh installs it)")
    events = run_history()
    page = tmp_path / "timeline.html"
    page.write_text(render(events, check(events)))
    shot = tmp_path / "timeline.png"
    args = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,800"]
    done = subprocess.run(
        [chromium, *args, f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (1200, 800)
    assert len(png) > 20_000, len(png)  # a blank page is about 5 KB
