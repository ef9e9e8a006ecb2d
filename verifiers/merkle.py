"""xxh3-128 Merkle trees, RFC 9162 shape, with leaf/node domain separation.

Definitions (docs/segment-format.md, "Merkle tree")::

    leaf(d)     = H(0x00 || d)
    node(l, r)  = H(0x01 || l || r)
    MTH([])     = H(b"")
    MTH([d])    = leaf(d)
    MTH(D[0:n]) = node(MTH(D[0:k]), MTH(D[k:n])), k = largest power of two < n

with ``H`` = xxh3-128 as 16 big-endian bytes. A node without a sibling is
promoted unchanged, never duplicated, so ``[a, b, c]`` and ``[a, b, c, c]``
have different roots.

xxh3 is fast and well distributed but not collision-resistant against an
adversary: these roots catch corruption and bugs, and let two regions compare
data cheaply. Authenticity comes from elsewhere (AES-GCM in segments).

Pure and synchronous: no I/O, no clock, safe to call from any thread.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

HASH_SIZE = 16
"""Bytes in every leaf hash, node hash and root."""

_LEAF = xxhash.xxh3_128(b"\x00")
_NODE_PREFIX = b"\x01"
_digest = xxhash.xxh3_128_digest

EMPTY_ROOT = _digest(b"")
"""``MTH([])``: the root of a tree with no leaves."""


def leaf_hash(data: bytes) -> bytes:
    """Return ``H(0x00 || data)``, the 16-byte hash of one leaf."""
    h = _LEAF.copy()  # a copy of the prefixed state: no concatenation of a large record
    h.update(data)
    return h.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return ``H(0x01 || left || right)``, the hash of an inner node."""
    return _digest(_NODE_PREFIX + left + right)


def merkle_root(leaf_hashes: Sequence[bytes]) -> bytes:
    """Return the root over ``leaf_hashes`` (each from ``leaf_hash``), in order.

    Computed level by level; an unpaired last node moves up unchanged, which
    gives exactly the largest-power-of-two split of the definition.
    Raises ``ValueError`` if a leaf hash is not 16 bytes.
    """
    level = list(leaf_hashes)
    if not level:
        return EMPTY_ROOT
    if any(len(h) != HASH_SIZE for h in level):
        raise ValueError(f"leaf hashes must be {HASH_SIZE} bytes")
    while len(level) > 1:
        odd = level[-1:] if len(level) & 1 else []
        lefts, rights = level[0 : len(level) - 1 : 2], level[1::2]
        level = [_digest(_NODE_PREFIX + a + b) for a, b in zip(lefts, rights, strict=True)] + odd
    return level[0]


class MerkleBuilder:
    """Incremental root in O(log n) memory: ``add`` leaves, then ``root()``.

    Keeps the roots of the perfect subtrees that make up the leaves so far, one
    per set bit of ``count`` (largest first), merging equal heights like the
    carries of a binary counter. ``root()`` folds them right to left, which is
    the largest-power-of-two split, so it equals ``merkle_root`` over the same
    leaves. ``root()`` does not consume the builder: more leaves may follow.
    """

    __slots__ = ("_count", "_stack")

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []  # (height, subtree root)
        self._count = 0

    @property
    def count(self) -> int:
        """Number of leaves added so far."""
        return self._count

    def add(self, record: bytes) -> None:
        """Add one record as the next leaf."""
        self.add_leaf(leaf_hash(record))

    def add_leaf(self, leaf_hash: bytes) -> None:
        """Add an already computed leaf hash. Raises ``ValueError`` if not 16 bytes."""
        if len(leaf_hash) != HASH_SIZE:
            raise ValueError(f"leaf hashes must be {HASH_SIZE} bytes")
        stack = self._stack
        height, node = 0, bytes(leaf_hash)
        while stack and stack[-1][0] == height:
            node = node_hash(stack.pop()[1], node)
            height += 1
        stack.append((height, node))
        self._count += 1

    def root(self) -> bytes:
        """Return the root over every leaf added so far (``EMPTY_ROOT`` if none)."""
        if not self._stack:
            return EMPTY_ROOT
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = node_hash(left, node)
        return node
