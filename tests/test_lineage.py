"""Which segments belong to the log when epochs change (pure)."""

from __future__ import annotations

import pytest

from replicators.lineage import boundaries, first_seqs, stale
from replicators.segment import SegmentHeader
from replicators.vault import SegmentRef


def refs(*pairs: tuple[int, int]) -> list[SegmentRef]:
    return [SegmentRef(epoch, seq, "s") for epoch, seq in pairs]


def test_one_epoch_has_nothing_stale() -> None:
    assert stale(refs((1, 1), (1, 2), (1, 3))) == []


def test_older_epoch_segments_past_the_newer_epochs_start_are_stale() -> None:
    log = refs((1, 10), (1, 11), (1, 12), (2, 11), (2, 12))
    assert stale(log) == refs((1, 11), (1, 12))


def test_segments_the_new_holder_adopted_stay() -> None:
    # epoch 2 began at 12: it adopted (1, 11)
    assert stale(refs((1, 10), (1, 11), (2, 12))) == []


def test_several_epochs_take_the_smallest_newer_start() -> None:
    log = refs((1, 10), (1, 11), (1, 14), (2, 11), (2, 13), (2, 14), (3, 14))
    assert stale(log) == refs((1, 11), (1, 14), (2, 14))
    assert boundaries(first_seqs(log)) == {1: 11, 2: 14}


def test_a_late_stale_segment_is_found_with_what_was_seen_before() -> None:
    # the reader applied (2, 11) long ago; (1, 11) arrives late, listed alone
    assert stale(refs((1, 11)), known={1: 1, 2: 11}) == refs((1, 11))
    assert stale(refs((1, 10)), known={1: 1, 2: 11}) == []


def test_a_sink_refuses_positions_that_are_not_a_range_of_integers() -> None:
    from replicators.errors import IntegrityError
    from replicators.sink import _positions

    def header(start: str, end: str) -> SegmentHeader:
        return SegmentHeader(
            version=1, stream="s", epoch=1, seq=1, start=start, end=end,
            first_source_time=0.0, last_source_time=0.0, record_count=0, created_at=0.0,
            key_id="k", wrapped_key=b"", salt=b"", commitment=b"", frame_size=1,
        )  # fmt: skip

    ref = SegmentRef(epoch=1, seq=1, stream="s")
    assert _positions(header("5", "9"), ref) == (5, 9)
    for start, end in (("0/16B3748", "9"), ("1_0", "20"), (" 5", "9"), ("9", "5"), ("", "")):
        with pytest.raises(IntegrityError, match="not a range of integers"):
            _positions(header(start, end), ref)
