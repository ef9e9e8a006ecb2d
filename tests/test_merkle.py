"""The xxh3-128 Merkle tree: definition, builder equivalence, sensitivity to every change."""

from __future__ import annotations

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from verifiers.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    MerkleBuilder,
    leaf_hash,
    merkle_root,
    node_hash,
)

H = xxhash.xxh3_128_digest


def reference_root(leaves: list[bytes]) -> bytes:
    """The recursive definition, written as in the spec."""
    if not leaves:
        return H(b"")
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return H(b"\x01" + reference_root(leaves[:k]) + reference_root(leaves[k:]))


def built_root(records: list[bytes]) -> bytes:
    builder = MerkleBuilder()
    for r in records:
        builder.add(r)
    assert builder.count == len(records)
    return builder.root()


records_st = st.lists(st.binary(max_size=64), max_size=70)


def test_hashes_follow_the_definition() -> None:
    a, b, c = (leaf_hash(x) for x in (b"a", b"b", b"c"))
    assert a == H(b"\x00a") and len(a) == HASH_SIZE
    assert node_hash(a, b) == H(b"\x01" + a + b)
    assert merkle_root([]) == EMPTY_ROOT == H(b"")
    assert merkle_root([a]) == a
    assert merkle_root([a, b]) == node_hash(a, b)
    # three leaves: the lone third leaf is promoted, not duplicated
    assert merkle_root([a, b, c]) == node_hash(node_hash(a, b), c)


def test_leaf_and_node_domains_are_separate() -> None:
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert leaf_hash(a + b) != node_hash(a, b)
    assert merkle_root([leaf_hash(b"")]) != EMPTY_ROOT


def test_duplicating_the_last_leaf_changes_the_root() -> None:
    leaves = [leaf_hash(x) for x in (b"a", b"b", b"c")]
    assert merkle_root(leaves) != merkle_root([*leaves, leaves[-1]])


@pytest.mark.parametrize("n", range(0, 70))
def test_matches_recursive_definition_for_every_small_size(n: int) -> None:
    records = [i.to_bytes(2, "big") for i in range(n)]
    leaves = [leaf_hash(r) for r in records]
    assert merkle_root(leaves) == reference_root(leaves) == built_root(records)


@settings(max_examples=150, deadline=None)
@given(records_st)
def test_builder_equals_merkle_root(records: list[bytes]) -> None:
    leaves = [leaf_hash(r) for r in records]
    assert built_root(records) == merkle_root(leaves) == reference_root(leaves)


@settings(max_examples=100, deadline=None)
@given(records_st.filter(bool), st.data())
def test_any_change_reorder_or_drop_changes_the_root(
    records: list[bytes], data: st.DataObject
) -> None:
    root = merkle_root([leaf_hash(r) for r in records])
    i = data.draw(st.integers(0, len(records) - 1), label="index")

    changed = list(records)
    changed[i] = records[i] + b"\x00"
    assert merkle_root([leaf_hash(r) for r in changed]) != root

    dropped = records[:i] + records[i + 1 :]
    assert merkle_root([leaf_hash(r) for r in dropped]) != root

    j = data.draw(st.integers(0, len(records) - 1), label="other")
    if records[i] != records[j]:
        swapped = list(records)
        swapped[i], swapped[j] = records[j], records[i]
        assert merkle_root([leaf_hash(r) for r in swapped]) != root


def test_builder_root_does_not_consume_and_memory_is_logarithmic() -> None:
    builder = MerkleBuilder()
    roots = []
    for i in range(1000):
        builder.add_leaf(leaf_hash(str(i).encode()))
        roots.append(builder.root())
        assert len(builder._stack) == bin(builder.count).count("1")
    leaves = [leaf_hash(str(i).encode()) for i in range(1000)]
    assert roots[-1] == merkle_root(leaves)
    assert roots[499] == merkle_root(leaves[:500])


def test_rejects_wrong_sized_leaf_hashes() -> None:
    with pytest.raises(ValueError):
        merkle_root([b"short"])
    with pytest.raises(ValueError):
        MerkleBuilder().add_leaf(b"x" * 17)
