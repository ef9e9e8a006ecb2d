"""The pure parts of agent groups: partitions of the key space, rendezvous assignment,
the configuration, the per-partition guard, and a new owner's replay of a partition log."""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, as_member, parse_config
from agent.group.assign import assignment, owner, plan
from replicators.keys import LocalKeyProvider, generate_key_file
from replicators.objects import records as rec
from replicators.objects.guard import GuardPolicy
from replicators.objects.handover import replay
from replicators.objects.index import LOGGED, Entry, ShippedIndex
from replicators.objects.kind import partition_guard
from replicators.objects.trees import partition_of_key
from replicators.partitions import Partition, check_count, parse, partition_of, partitions
from replicators.segment import seal
from replicators.vault import SegmentRef, Vault
from tests.test_cost import MemoryStore
from verifiers.objects import KeyTree

KEYS = [f"datasets/{i:06d}.parquet" for i in range(4000)]


def test_partitions_are_contiguous_ranges_of_the_key_tree_buckets() -> None:
    tree = KeyTree()
    for count in (2, 8, 64):
        bits = count.bit_length() - 1
        for key in KEYS[:500]:
            assert partition_of(key, count) == tree.bucket(key) >> (tree.depth - bits)
            assert partition_of(key, count) == partition_of_key(key, count)
    assert all(partition_of(k, 1) == 0 for k in KEYS[:10])


def test_partition_names_round_trip_and_plain_streams_are_one_partition() -> None:
    for p in partitions("data", 16):
        assert parse(p.name) == p
        assert p.name == f"data--p{p.index}-of-16"
    assert parse("data") == Partition("data", 0, 1)
    assert partitions("data", 1)[0].name == "data"
    for bad in (0, 3, 12, 8192):
        with pytest.raises(ValueError, match="power of two"):
            check_count(bad)


def test_every_key_falls_in_exactly_one_partition_and_they_are_balanced() -> None:
    parts = partitions("data", 8)
    counts = collections.Counter(partition_of(k, 8) for k in KEYS)
    assert sorted(counts) == list(range(8))
    assert min(counts.values()) > len(KEYS) / 8 * 0.8
    for key in KEYS[:200]:
        assert sum(p.accept()(key) for p in parts) == 1


def test_rendezvous_moves_only_what_the_new_member_wins_or_the_leaver_held() -> None:
    parts = [p.name for p in partitions("data", 64)]
    before = assignment(parts, ["a-1", "a-2", "a-3"])
    after = assignment(parts, ["a-1", "a-2", "a-3", "a-4"])
    moved = {p for p in parts if before[p] != after[p]}
    assert moved and all(after[p] == "a-4" for p in moved)
    assert 8 <= len(moved) <= 24  # about a quarter of 64
    gone = assignment(parts, ["a-1", "a-3"])  # a-2 leaves: only its partitions move
    assert {p for p in parts if before[p] != gone[p]} == {p for p in parts if before[p] == "a-2"}
    loads = collections.Counter(before.values())
    assert min(loads.values()) >= 12  # 64 over 3: 21 on average
    assert owner("x", []) is None and assignment(["x"], []) == {"x": None}


def test_plan_releases_before_taking_and_a_lost_member_keeps_nothing() -> None:
    parts = [p.name for p in partitions("data", 16)]
    members = ["a-1", "a-2"]
    mine = {p for p in parts if owner(p, members) == "a-1"}
    step = plan("a-1", members, held=set(), parts=parts)
    assert step.take == mine and not step.release
    joined = ["a-1", "a-2", "a-3"]
    now = {p for p in parts if owner(p, joined) == "a-1"}
    step = plan("a-1", joined, held=mine, parts=parts)
    assert step.release == mine - now and step.take == now - mine
    assert plan("a-1", ["a-2"], held=mine, parts=parts).release == mine  # not a member


def base_config(tmp_path: Path, **stream: Any) -> dict[str, Any]:
    (tmp_path / "secret").write_text("x")
    secret = f"file:{tmp_path / 'secret'}"
    s3 = {
        "endpoint": "http://127.0.0.1:1",
        "bucket": "v",
        "access_key": secret,
        "secret_key": secret,
    }
    keys = {"provider": "local", "key_file": str(tmp_path / "k")}
    objects = {"source": s3, "mirror": s3} | stream.pop("objects", {})
    return {
        "region": "a",
        "role": "active",
        "data_dir": str(tmp_path / "data"),
        "vault": s3,
        "keys": keys,
        "etcd": {"endpoints": ["http://127.0.0.1:2379"]},
        "group": {"enabled": True},
        "streams": [{"name": "data", "kind": "objects", "objects": objects} | stream],
    }


def test_config_partitions_and_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config(base_config(tmp_path, partitions=16))
    assert cfg.streams[0].partitions == 16
    for stream, why in (
        ({"partitions": 12}, "power of two"),
        ({"partitions": 8, "objects": {"events": "webhook"}}, "one receiver"),
    ):
        with pytest.raises(ConfigError, match=why):
            parse_config(base_config(tmp_path, **stream))
    no_etcd = base_config(tmp_path) | {"etcd": {"endpoints": []}}
    with pytest.raises(ConfigError, match="etcd"):
        parse_config(no_etcd)
    member = as_member(cfg, "a-2", "127.0.0.1:7171")
    assert member.data_dir == cfg.data_dir / "members" / "a-2"
    assert member.signing_key_path == cfg.data_dir / "report-signing.key"
    assert (member.instance, member.http.listen) == ("a-2", "127.0.0.1:7171")
    monkeypatch.delenv("DRAGENT_INSTANCE", raising=False)
    with pytest.raises(ConfigError, match="instance"):
        as_member(cfg, None)
    with pytest.raises(ConfigError, match="instance"):
        as_member(cfg, "Bad Name")
    monkeypatch.setenv("DRAGENT_INSTANCE", "a-3")
    assert as_member(cfg, None).instance == "a-3"


def test_each_partition_guards_its_share_of_the_deletes() -> None:
    policy = GuardPolicy(share=0.05, count=10_000, window=600, min_deletes=100)
    assert partition_guard(policy, 1) == policy
    eighth = partition_guard(policy, 8)
    assert (eighth.share, eighth.count, eighth.min_deletes) == (0.05 / 8, 1250, 13)
    # a mirror of 80,000 keys: the stream allows 4,000 deletes, each partition 500
    assert policy.limit(80_000) == 4000 and eighth.limit(80_000) == 500


async def test_a_new_owner_learns_from_the_log_what_was_shipped(tmp_path: Path) -> None:
    """The log says: a put then deleted, b put, c's transfer unfinished, d put in the state
    the index already holds. The index had a (stale), d (same state) and z (not in the
    log). After the replay: a gone, b and c to capture again (empty etag), d and z kept."""
    generate_key_file(tmp_path / "kek.key")
    keys = LocalKeyProvider(tmp_path / "kek.key")
    store = MemoryStore()
    vault = Vault(store)  # type: ignore[arg-type]
    name = "data--p3-of-8"
    head = rec.Head(5, "text/plain", {"k": "v"}, "0" * 32)
    segments = [
        [
            rec.Put("a", rec.Version(10, 0), head, b"hello"),
            rec.Put("d", rec.Version(11, 1), head, b"hello"),
        ],
        [
            rec.Delete("a", rec.Version(20, 2)),
            rec.Put("b", rec.Version(21, 3), head, b"hello"),
            rec.Part("c", rec.Version(22, 4), head, 0, 2, 0, b"hel"),
        ],
    ]
    for seq, records in enumerate(segments, 1):
        blob = seal(
            [rec.encode(r) for r in records],
            stream=name, epoch=2, seq=seq, start="0", end="1",
            first_source_time=time.time(), last_source_time=time.time(),
            data_key=await keys.data_key(), created_at=time.time(),
        )  # fmt: skip
        await vault.put_segment(SegmentRef(epoch=2, seq=seq, stream=name), blob)
    index = ShippedIndex(tmp_path / "shipped.sqlite")
    meta = rec.meta_fingerprint("text/plain", {"k": "v"})
    d = Entry("d", "etag-d", 5, 11, "0" * 32, meta, 99)
    index.commit([("a", Entry("a", "etag-a", 5, 1, "1" * 32, meta, 0)), ("d", d)])
    index.commit([("z", Entry("z", "etag-z", 1, 1, "2" * 32, meta, 0))])
    changed = await replay(index, vault, keys, name)
    assert changed == 3
    assert index.get("a") is None
    b = index.get("b")
    assert b is not None and (b.etag, b.size, b.time_ns, b.meta) == (LOGGED, 5, 21, meta)
    c = index.get("c")
    assert c is not None and (c.etag, c.size, c.time_ns) == (LOGGED, 0, 0)
    assert index.get("d") == d and index.get("z") is not None
    index.close()
    await keys.aclose()
