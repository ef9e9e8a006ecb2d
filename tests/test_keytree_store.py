"""Persisted key trees (replicators/objects/trees.py): the same roots and nodes as the
in-memory KeyTree, incremental updates, rebuilds with a journal, records from the stream."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from replicators.objects import records as rec
from replicators.objects.index import Entry, ShippedIndex
from replicators.objects.trees import (
    Row,
    TreeStore,
    key_bucket,
    partition_of_key,
    record_changes,
    update_from_records,
)
from verifiers.objects import KeyTree, compare


def _hash(i: int) -> str:
    return f"{i:032x}"


def _fill(n: int, seed: int = 1) -> dict[str, tuple[int, str]]:
    rnd = random.Random(seed)
    return {f"k/{i:06d}": (rnd.randrange(1 << 20), _hash(rnd.randrange(1 << 60))) for i in range(n)}


def test_same_root_and_nodes_as_the_in_memory_tree(tmp_path: Path) -> None:
    keys = _fill(3000)
    mem, disk = KeyTree(), TreeStore(tmp_path / "t.sqlite", partitions=16)
    for k, (size, digest) in keys.items():
        mem.put(k, size, digest)
    disk.apply((k, Row(size, digest)) for k, (size, digest) in keys.items())
    assert disk.root() == mem.root() != b"\x00" * 16
    assert len(disk) == len(mem) == 3000
    for i in [1, 2, 3, 16, 17, 31, 1000, (1 << 16) + key_bucket("k/000007")]:
        assert disk.node(i) == mem.node(i)
    b = key_bucket("k/000007")
    assert disk.leaves(b) == mem.leaves(b)
    assert disk.node_at(16, b) == mem.node((1 << 16) + b)
    # changes one at a time, removals included
    for k in list(keys)[:50]:
        mem.remove(k)
        disk.remove(k)
    mem.put("k/000100", 1, _hash(5))
    disk.put("k/000100", 1, _hash(5))
    assert disk.root() == mem.root()
    assert compare(mem, disk).keys == []
    disk.close()


def test_survives_reopen_and_partitions_are_contiguous(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    disk = TreeStore(path)
    disk.apply((k, Row(s, h)) for k, (s, h) in _fill(500).items())
    root = disk.root()
    disk.close()
    again = TreeStore(path)
    assert again.root() == root and len(again) == 500
    for k in list(_fill(500))[:20]:
        p = partition_of_key(k, 64)
        assert key_bucket(k) in again.partition_range(p)
    with pytest.raises(ValueError):
        TreeStore(path, partitions=32)
    again.close()


def test_compare_persisted_trees_finds_the_differences(tmp_path: Path) -> None:
    keys = _fill(5000)
    a, b = TreeStore(tmp_path / "a.sqlite"), TreeStore(tmp_path / "b.sqlite", partitions=8)
    a.rebuild(((k, Row(s, h)) for k, (s, h) in keys.items()), "test")
    changed = dict(keys)
    changed["k/000001"] = (1, _hash(1))  # content differs
    del changed["k/000002"]  # missing on b
    changed["extra"] = (3, _hash(3))  # only on b
    b.rebuild(((k, Row(s, h)) for k, (s, h) in changed.items()), "test")
    assert a.built_at is not None
    found = compare(a, b)
    assert found.keys == ["extra", "k/000001", "k/000002"]
    assert found.nodes_compared < 200
    a.close()
    b.close()


def test_rebuild_replays_changes_made_meanwhile(tmp_path: Path) -> None:
    store = TreeStore(tmp_path / "t.sqlite")
    store.put("stale", 1, _hash(1))  # drift: gone from the listing
    build = store.begin_rebuild()
    build.add([("a", Row(1, _hash(1))), ("b", Row(2, _hash(2)))])
    store.put("c", 3, _hash(3))  # the stream goes on during the rebuild
    store.remove("a")
    build.finish("listing")
    mem = KeyTree()
    mem.put("b", 2, _hash(2))
    mem.put("c", 3, _hash(3))
    assert store.root() == mem.root()
    assert store.info()["built_from"] == "listing"
    store.close()


def test_update_from_records_follows_the_mirror(tmp_path: Path) -> None:
    store = TreeStore(tmp_path / "m.sqlite")
    head = rec.Head(5, "text/plain", {}, _hash(9))
    big = rec.Head(12, "", {}, _hash(8))
    records = [
        rec.encode(rec.Put("a", rec.Version(10, 1), head, b"hello")),
        rec.encode(rec.Part("big", rec.Version(10, 2), big, 0, 2, 0, b"x" * 6)),
        rec.encode(rec.Delete("gone", rec.Version(10, 3))),
    ]
    store.put("gone", 1, _hash(1))
    assert [k for k, _ in record_changes(records)] == ["a", "gone"]
    update_from_records(store, records)
    assert store.get("a") == Row(5, _hash(9), "", (10, 1)) and store.get("gone") is None
    assert store.get("big") is None  # not complete yet
    update_from_records(store, [rec.Part("big", rec.Version(10, 2), big, 1, 2, 6, b"y" * 6)])
    assert store.get("big") == Row(12, _hash(8), "", (10, 2))
    # an older segment re-applied changes nothing
    old = rec.Head(3, "", {}, _hash(7))
    assert update_from_records(store, [rec.Put("a", rec.Version(9, 9), old, b"old")]) == 0
    assert store.get("a").size == 5  # type: ignore[union-attr]
    store.close()


def test_shipping_index_keeps_the_source_tree(tmp_path: Path) -> None:
    path = tmp_path / "shipped.sqlite"
    index = ShippedIndex(path)
    index.commit([("a", Entry("a", "e1", 5, 1, _hash(1))), ("b", Entry("b", "e2", 6, 2, _hash(2)))])
    index.commit([("a", None)])
    index.close()
    tree = TreeStore(path)
    mem = KeyTree()
    mem.put("b", 6, _hash(2))
    assert tree.root() == mem.root() and tree.built_at is not None
    assert tree.get("b") == Row(6, _hash(2), "e2", (0, 0))
    tree.close()


def test_an_older_index_gets_its_tree_built_on_open(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "shipped.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE shipped (key TEXT PRIMARY KEY, etag TEXT, size INTEGER,"
        " time_ns INTEGER, hash TEXT) WITHOUT ROWID"
    )
    db.execute("INSERT INTO shipped VALUES ('x', 'e', 3, 1, ?)", (_hash(3),))
    db.commit()
    db.close()
    ShippedIndex(path).close()
    tree = TreeStore(path)
    mem = KeyTree()
    mem.put("x", 3, _hash(3))
    assert tree.root() == mem.root()
    tree.close()
