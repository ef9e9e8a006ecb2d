"""A stream cut into partitions: which partition a key falls in, and each partition's log.

An objects stream of ``count`` partitions (a power of two) splits the key space by the
top bits of ``xxh3_64(key)``, the same hash the Merkle key trees bucket by
(``verifiers.objects.KeyTree``), so partition ``p`` covers a contiguous range of tree
buckets. Each partition is a stream of its own in the vault, with its own log, named
``<stream>--p<p>-of-<count>``: whichever agent of the region owns the partition appends
to that log, so the log stays continuous across owners, and the sinks of the other
region apply it partition by partition. A stream of one partition is the stream itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

MAX_PARTITIONS = 4096
_NAME = re.compile(r"^(?P<stream>[a-z0-9][a-z0-9-]*?)--p(?P<index>\d+)-of-(?P<count>\d+)$")


def check_count(count: int) -> int:
    """``count`` if it is a power of two from 1 to ``MAX_PARTITIONS``; else ValueError."""
    if count < 1 or count > MAX_PARTITIONS or count & (count - 1):
        raise ValueError(f"expected a power of two from 1 to {MAX_PARTITIONS}, got {count}")
    return count


def partition_of(key: str, count: int) -> int:
    """The partition of ``key`` among ``count`` (the top bits of its xxh3_64)."""
    if count == 1:
        return 0
    return xxhash.xxh3_64_intdigest(key.encode()) >> (64 - (count.bit_length() - 1))


@dataclass(frozen=True, order=True)
class Partition:
    """Partition ``index`` of ``count`` of ``stream``."""

    stream: str
    index: int
    count: int

    @property
    def name(self) -> str:
        """The partition's own stream name (its log in the vault, its state directory)."""
        if self.count == 1:
            return self.stream
        return f"{self.stream}--p{self.index}-of-{self.count}"

    def accept(self) -> Callable[[str], bool]:
        """A predicate true for the keys of this partition."""
        index, count = self.index, self.count
        return lambda key: partition_of(key, count) == index


def partitions(stream: str, count: int) -> list[Partition]:
    check_count(count)
    return [Partition(stream, i, count) for i in range(count)]


def parse(name: str) -> Partition:
    """The partition a log name stands for; a plain stream name is partition 0 of 1."""
    m = _NAME.match(name)
    if m is None:
        return Partition(name, 0, 1)
    return Partition(m["stream"], int(m["index"]), int(m["count"]))
