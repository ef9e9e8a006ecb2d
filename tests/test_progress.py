"""Watermarks, RPO arithmetic, backoff and continuity checks: pure logic, time passed in."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.backoff import Backoff
from replicators.errors import IntegrityError
from replicators.logs import RateLimited
from replicators.postgres.lsn import LsnClock
from replicators.progress import StreamProgress
from replicators.sink import check_continuity
from replicators.stream import Applied
from replicators.vault import SegmentRef


def _progress(started_at: float = 0.0) -> StreamProgress:
    return StreamProgress("s", "synthetic", "source", started_at=started_at)


def test_rpo_is_zero_once_a_step_made_everything_captured_durable() -> None:
    p = _progress(started_at=99.0)
    p.capture(10, source_time=100.0, now=100.1, first_time=99.0)
    assert p.rpo(now=101.0) == pytest.approx(2.0)  # oldest pending change is from t=99
    p.durable(10, source_time=100.0, now=101.2, next_time=None)
    p.step_done(began=101.2)
    assert p.rpo(now=101.2) == 0.0
    assert p.proven_at == 101.2


def test_without_a_proof_the_rpo_grows_with_now() -> None:
    p = _progress(started_at=1000.0)
    p.source_pending = lambda: None  # nothing known to be pending: no proof either
    assert p.rpo(now=1000.0) == 0.0
    assert p.rpo(now=1030.0) == pytest.approx(30.0)
    assert p.rpo(now=4600.0) == pytest.approx(3600.0)


def test_durable_alone_is_no_proof() -> None:
    p = _progress(started_at=10.0)
    p.capture(5, 11.0, 11.0, 11.0)
    p.durable(5, 11.0, 11.5, None)
    assert p.rpo(now=70.0) == pytest.approx(60.0)


def test_a_proof_resets_the_rpo_and_then_it_grows_again() -> None:
    p = _progress(started_at=0.0)
    p.source_pending = lambda: None
    p.capture(1, 10.0, 10.1, 10.0)
    p.durable(1, 10.0, 10.2, None)
    p.step_done(began=9.9)
    assert p.rpo(now=10.2) == pytest.approx(0.3)  # proven as of when the step began
    assert p.rpo(now=40.0) == pytest.approx(30.1)  # then the stream died: no new proof


def test_no_proof_while_not_live() -> None:
    p = _progress(started_at=0.0)
    p.live = False
    p.capture(1, 10.0, 10.0, 10.0)
    p.durable(1, 10.0, 10.1, None)
    p.step_done(began=10.0)
    p.prove(10.0)
    assert p.proven_at is None
    assert p.rpo(now=20.0) == pytest.approx(20.0)
    p.live = True
    p.prove(19.0)
    assert p.rpo(now=20.0) == pytest.approx(1.0)


def test_a_step_with_something_still_pending_in_the_shipper_proves_nothing() -> None:
    p = _progress(started_at=0.0)
    p.capture(2, 5.0, 5.0, 4.0)
    p.step_done(began=5.0)  # captured up to 2, nothing durable yet
    assert p.proven_at is None


def test_a_step_proves_up_to_the_oldest_change_the_source_still_holds() -> None:
    p = _progress(started_at=0.0)
    p.source_pending = lambda: 3.0  # a backlog the batch did not take, from t=3
    p.capture(1, 2.0, 8.0, 1.0)
    p.durable(1, 2.0, 9.0, None)
    p.step_done(began=8.0)
    assert p.proven_at == 3.0
    assert p.rpo(now=10.0) == pytest.approx(7.0)


def test_recovery_is_no_proof_the_rpo_counts_from_the_last_durable_change() -> None:
    p = _progress(started_at=1000.0)
    p.source_pending = lambda: None
    p.resumed(position=40, source_time=400.0, now=1000.0)
    assert p.proven_at is None
    assert p.marks["durable"].position == 40
    assert p.rpo(now=1000.0) == pytest.approx(600.0)  # down since the change at t=400
    p.resumed(position=40, source_time=None, now=1001.0)  # a new stream keeps that floor
    assert p.rpo(now=1001.0) == pytest.approx(601.0)


def test_recovery_without_a_checkpoint_counts_from_when_progress_was_created() -> None:
    p = _progress(started_at=50.0)
    p.resumed(position=0, source_time=None, now=60.0)
    assert p.rpo(now=80.0) == pytest.approx(30.0)


def test_recovery_after_a_proof_keeps_the_proof() -> None:
    p = _progress(started_at=0.0)
    p.prove(90.0)
    p.resumed(position=7, source_time=80.0, now=95.0)
    assert p.rpo(now=100.0) == pytest.approx(10.0)


def test_a_pending_change_older_than_the_last_proof_dominates() -> None:
    p = _progress(started_at=0.0)
    p.prove(100.0)
    p.source_pending = lambda: 95.0  # seen by the source, older than the proof
    assert p.rpo(now=101.0) == pytest.approx(6.0)


def test_rpo_after_idle_counts_from_first_pending_change_not_last_durable() -> None:
    p = _progress(started_at=0.0)
    p.capture(1, 10.0, 10.0, 10.0)
    p.durable(1, 10.0, 10.1, None)
    p.step_done(began=10.0)
    p.prove(3609.0)  # e.g. head reads while idle
    # an hour idle, then one change at t=3610 not yet durable
    p.capture(2, 3610.0, 3610.0, 3610.0)
    assert p.rpo(now=3610.5) == pytest.approx(1.5)  # from the last proof, at 3609


def test_rpo_includes_changes_still_inside_the_source() -> None:
    p = _progress(started_at=50.0)
    p.prove(50.5)
    p.source_pending = lambda: 50.0
    assert p.rpo(now=50.75) == pytest.approx(0.75)
    p.source_pending = lambda: None
    assert p.rpo(now=50.75) == pytest.approx(0.25)


def test_a_head_within_the_durable_position_is_a_proof_while_live() -> None:
    p = _progress(started_at=0.0)
    head: list[tuple[int, float]] = [(100, 20.0)]
    p.source_head = lambda: head[-1]
    p.resumed(position=90, source_time=5.0, now=10.0)
    assert p.rpo(now=21.0) == pytest.approx(16.0)  # head at 100 is beyond durable 90
    p.capture(100, 19.0, 21.0, 18.0)
    p.durable(100, 19.0, 21.5, None)
    assert p.rpo(now=21.5) == pytest.approx(1.5)  # the head read at t=20 is now durable
    head.append((100, 30.0))
    p.live = False  # the stream failed: a newer head read proves nothing
    assert p.rpo(now=40.0) == pytest.approx(20.0)
    p.live = True
    head.append((150, 41.0))  # written since: beyond durable
    assert p.rpo(now=42.0) == pytest.approx(22.0)


def test_snapshot_shows_the_proof_and_a_growing_rpo() -> None:
    p = _progress(started_at=0.0)
    p.prove(10.0)
    assert p.snapshot(now=25.0)["rpo_seconds"] == pytest.approx(15.0)
    assert p.snapshot(now=25.0)["proven_at"] == 10.0


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


def test_an_idle_primary_is_proven_by_its_insert_lsn_samples() -> None:
    clock = LsnClock()
    p = _progress(started_at=0.0)
    p.source_head = clock.latest
    p.resumed(position=500, source_time=1.0, now=2.0)
    for i in range(10):  # idle: the insert LSN stays at the durable end
        clock.add(500, 2.0 + i * 0.1)
        assert p.rpo(now=2.05 + i * 0.1) == pytest.approx(0.05)
    clock.add(600, 3.0)  # a write the shipper has not captured
    assert p.rpo(now=4.0) == pytest.approx(1.1)  # from the last sample within durable, t=2.9


def test_checkpoint_save_finishes_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.write may write fewer bytes than asked: save loops until all are written."""
    import os as real_os

    from replicators import checkpoint

    write = real_os.write

    def short(fd: int, data: bytes | memoryview) -> int:
        return write(fd, bytes(data)[:7])  # at most 7 bytes a call

    monkeypatch.setattr(checkpoint.os, "write", short)
    state = {"stream": "s", "epoch": 3, "seq": 41, "end": 123456789, "note": "x" * 100}
    checkpoint.save(tmp_path / "state.json", state)
    assert checkpoint.load(tmp_path / "state.json") == state
