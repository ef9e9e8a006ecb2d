"""Watermarks, RPO arithmetic, backoff and continuity checks: pure logic, time passed in."""

from __future__ import annotations

import pytest

from agent.backoff import Backoff
from agent.logs import RateLimited
from replicators.errors import IntegrityError
from replicators.progress import StreamProgress
from replicators.sink import check_continuity
from replicators.stream import Applied
from replicators.vault import SegmentRef


def test_rpo_is_zero_when_everything_captured_is_durable() -> None:
    p = StreamProgress("s", "synthetic", "source")
    p.capture(10, source_time=100.0, now=100.1, first_time=99.0)
    assert p.rpo(now=101.0) == pytest.approx(2.0)  # oldest pending change is from t=99
    p.durable(10, source_time=100.0, now=101.2, next_time=None)
    assert p.rpo(now=500.0) == 0.0


def test_rpo_after_idle_counts_from_first_pending_change_not_last_durable() -> None:
    p = StreamProgress("s", "synthetic", "source")
    p.capture(1, 10.0, 10.0, 10.0)
    p.durable(1, 10.0, 10.1, None)
    # an hour idle, then one change at t=3610 not yet durable
    p.capture(2, 3610.0, 3610.0, 3610.0)
    assert p.rpo(now=3610.5) == pytest.approx(0.5)


def test_rpo_includes_changes_still_inside_the_source() -> None:
    p = StreamProgress("s", "synthetic", "source")
    p.source_pending = lambda: 50.0
    assert p.rpo(now=50.75) == pytest.approx(0.75)
    p.source_pending = lambda: None
    assert p.rpo(now=50.75) == 0.0


def test_watermarks_never_move_backwards() -> None:
    p = StreamProgress("s", "synthetic", "sink")
    p.advance("applied", 10, 1.0, 1.0)
    p.advance("applied", 5, 2.0, 2.0)
    assert p.marks["applied"].position == 10
    snap = p.snapshot(now=3.0)
    assert snap["applied"] == {"position": 10, "source_time": 1.0, "reached_at": 1.0}
    assert snap["apply_lag_seconds"] == pytest.approx(2.0)


def test_backoff_is_capped_and_jittered() -> None:
    b = Backoff(base=0.5, cap=4.0)
    delays = [b.next_delay(0.999) for _ in range(10)]
    assert delays[0] == pytest.approx(0.4995)
    assert max(delays) <= 4.0
    assert delays[-1] == pytest.approx(3.996)
    assert b.next_delay(0.0) == 0.0
    b.reset()
    assert b.next_delay(0.5) == pytest.approx(0.25)


def test_rate_limited_log_holds_repeats_and_counts_them() -> None:
    r = RateLimited(interval=10.0)
    assert r.allow("e", now=0.0) == 0
    assert r.allow("e", now=1.0) is None
    assert r.allow("e", now=2.0) is None
    assert r.allow("e", now=10.5) == 2
    assert r.forget("e") is True
    assert r.forget("e") is False


class _Header:
    def __init__(self, start: int) -> None:
        self.start = str(start)


def _applied(seq: int, end: int, epoch: int = 1) -> Applied:
    return Applied(ref=SegmentRef(epoch=epoch, seq=seq, stream="s"), end=end, source_time=0.0)


def test_continuity_accepts_the_next_segment() -> None:
    check_continuity(_applied(4, 100), SegmentRef(1, 5, "s"), _Header(100))  # type: ignore[arg-type]
    check_continuity(None, SegmentRef(1, 9, "s"), _Header(700))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ref", "start", "message"),
    [
        (SegmentRef(1, 6, "s"), 100, "expected seq 5, found 6"),
        (SegmentRef(1, 5, "s"), 101, "starts at 101, previous ended at 100"),
        (SegmentRef(1, 5, "s"), 99, "starts at 99, previous ended at 100"),
        (SegmentRef(0, 5, "s"), 100, "epoch 0 is older than applied 1"),
    ],
)
def test_continuity_rejects_gaps_overlaps_and_old_epochs(
    ref: SegmentRef, start: int, message: str
) -> None:
    with pytest.raises(IntegrityError, match=message):
        check_continuity(_applied(4, 100), ref, _Header(start))  # type: ignore[arg-type]


def test_segment_names_sort_as_the_log() -> None:
    refs = [SegmentRef(2, 1, "s"), SegmentRef(1, 10, "s"), SegmentRef(1, 9, "s")]
    assert sorted(r.key for r in refs) == [r.key for r in sorted(refs)]
    assert SegmentRef.parse(SegmentRef(3, 42, "wal").key) == SegmentRef(3, 42, "wal")
    with pytest.raises(IntegrityError):
        SegmentRef.parse("streams/wal/3/42.seg")
