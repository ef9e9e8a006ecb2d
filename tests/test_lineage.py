"""Which segments belong to the log when epochs change (pure)."""

from __future__ import annotations

from replicators.lineage import boundaries, first_seqs, stale
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
