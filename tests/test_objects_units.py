"""Pure parts of the objects kind: records, versions, notification parsing, the change queue."""

from __future__ import annotations

import json

import pytest

from replicators.errors import IntegrityError
from replicators.objects import records as rec
from replicators.objects.events import JsonStream, filer_hints, s3_event_hints
from replicators.objects.queue import ChangeQueue

HEAD = rec.Head(5, "text/plain", {"owner": "ml"}, rec.content_hash(b"hello"))


def test_records_round_trip() -> None:
    v = rec.Version(1_700_000_000_000_000_000, 42)
    for record in (
        rec.Put("a/b c.txt", v, HEAD, b"hello"),
        rec.Part("big", v, HEAD, 1, 3, 5 << 20, b"x" * 10),
        rec.Delete("gone/é", v),
    ):
        assert rec.decode(rec.encode(record)) == record


def test_malformed_records_are_integrity_errors() -> None:
    good = rec.encode(rec.Put("k", rec.Version(1, 2), HEAD, b"hello"))
    with pytest.raises(IntegrityError):
        rec.decode(good[:-1])  # body shorter than its size
    with pytest.raises(IntegrityError):
        rec.decode(b"X" + good[1:])
    with pytest.raises(IntegrityError):
        rec.decode(b"P\x00")


def test_versions_order_by_time_then_capture_sequence() -> None:
    assert rec.Version(10, 1) < rec.Version(10, 2) < rec.Version(11, 0)
    assert rec.Version.decode(rec.Version(10, 2).encode()) == rec.Version(10, 2)
    with pytest.raises(IntegrityError):
        rec.Version.decode("10")


def test_restore_planner_keeps_the_greatest_version_whatever_the_log_order() -> None:
    from replicators.objects.restore import Planner
    from replicators.vault import SegmentRef

    planner = Planner("", to_ns=100)
    new, old = rec.Version(50, 9), rec.Version(40, 3)
    planner.add(rec.Put("k", new, HEAD, b"new"), SegmentRef(1, 1, "s"), 0)
    planner.add(rec.Put("k", old, HEAD, b"old"), SegmentRef(1, 2, "s"), 0)  # replayed later
    planner.add(rec.Delete("k", rec.Version(45, 5)), SegmentRef(1, 3, "s"), 0)
    assert planner.winners["k"].record.version == new
    planner.add(rec.Delete("k", rec.Version(60, 10)), SegmentRef(1, 4, "s"), 0)
    assert isinstance(planner.winners["k"].record, rec.Delete)


def test_part_count() -> None:
    assert rec.part_count(0, 5) == 1
    assert rec.part_count(10, 5) == 2
    assert rec.part_count(11, 5) == 3


# The documented shape of an S3 event notification (AWS S3 user guide,
# "Event message structure"; MinIO sends the same).
S3_EVENT = {
    "Records": [
        {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-west-2",
            "eventTime": "2026-11-28T10:00:00.000Z",
            "eventName": "ObjectCreated:Put",
            "s3": {
                "s3SchemaVersion": "1.0",
                "bucket": {"name": "data", "arn": "arn:aws:s3:::data"},
                "object": {
                    "key": "logs/run+1/%C3%A9t%C3%A9.json",
                    "size": 1024,
                    "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                    "sequencer": "0055AED6DCD90281E5",
                },
            },
        },
        {
            "eventName": "ObjectRemoved:Delete",
            "eventTime": "2026-11-28T10:00:01Z",
            "s3": {"bucket": {"name": "data"}, "object": {"key": "old", "sequencer": "0A"}},
        },
    ]
}


def test_s3_event_notification() -> None:
    put, delete = s3_event_hints(json.loads(json.dumps(S3_EVENT)))
    assert put.key == "logs/run 1/été.json" and not put.deleted and put.bucket == "data"
    assert put.sequencer == "0055AED6DCD90281E5" and put.time > 1.7e9
    assert delete.key == "old" and delete.deleted
    assert s3_event_hints({"Event": "s3:TestEvent", "Service": "Amazon S3"}) == []


def _entry(name: str) -> dict[str, object]:
    return {"name": name, "isDirectory": False, "attributes": {"fileSize": "3"}}


def test_filer_events() -> None:
    create = {
        "directory": "/buckets/data/x",
        "eventNotification": {"oldEntry": None, "newEntry": _entry("a.txt")},
        "tsNs": "1795859973176216701",
    }
    (hint,) = filer_hints(create)
    assert (hint.bucket, hint.key, hint.deleted) == ("data", "x/a.txt", False)
    assert hint.time == pytest.approx(1795859973.176, abs=0.01)
    delete = {"directory": "/buckets/data/x", "eventNotification": {"oldEntry": _entry("a.txt")}}
    assert [h.deleted for h in filer_hints(delete)] == [True]
    rename = {
        "directory": "/buckets/data/x",
        "eventNotification": {
            "oldEntry": _entry("a.txt"),
            "newEntry": _entry("b.txt"),
            "newParentPath": "/buckets/data/y",
        },
    }
    assert [(h.key, h.deleted) for h in filer_hints(rename)] == [
        ("x/a.txt", True),
        ("y/b.txt", False),
    ]
    folder = {
        "directory": "/buckets/data",
        "eventNotification": {"newEntry": {"name": "x", "isDirectory": True}},
    }
    assert filer_hints(folder) == []
    upload = {
        "directory": "/buckets/data/.uploads/123",
        "eventNotification": {"newEntry": _entry("0001.part")},
    }
    assert filer_hints(upload) == []


def test_json_stream_splits_pretty_printed_objects() -> None:
    text = json.dumps({"a": 1}, indent=2) + "\n" + json.dumps({"b": "}{"}, indent=2)
    stream = JsonStream()
    raw = text.encode()
    got = list(stream.feed(raw[:7])) + list(stream.feed(raw[7:20])) + list(stream.feed(raw[20:]))
    assert got == [{"a": 1}, {"b": "}{"}]


def test_change_queue_deduplicates_and_holds_keys_in_flight() -> None:
    q = ChangeQueue()
    q.add("a", 5.0)
    q.add("b", 3.0)
    q.add("a", 4.0)
    assert len(q) == 2 and q.oldest() == 3.0
    assert q.pop() == ("a", 4.0)
    q.hold("a")
    q.add("a", 9.0)  # a change during the capture waits for it
    assert "a" not in q
    q.release("a")
    assert q.pop() == ("b", 3.0)
    assert q.pop() == ("a", 9.0)
    assert q.pop() is None and q.oldest() is None


def test_key_tree_is_incremental_and_order_independent() -> None:
    from verifiers.objects import KeyTree

    a, b = KeyTree(depth=8), KeyTree(depth=8)
    for i in range(500):
        a.put(f"k{i}", i, f"{i:032x}")
    for i in reversed(range(600)):
        b.put(f"k{i}", i, f"{i:032x}")
    a.root()  # computed, then changed incrementally
    for i in range(500, 600):
        a.put(f"k{i}", i, f"{i:032x}")
    a.put("k7", 1, "0" * 32)
    a.put("k7", 7, f"{7:032x}")
    assert a.root() == b.root() and len(a) == 600
    b.remove("k3")
    assert a.root() != b.root()


def test_key_tree_comparison_descends_only_into_differences() -> None:
    from verifiers.objects import KeyTree, compare

    a, b = KeyTree(), KeyTree()
    for i in range(20_000):
        a.put(f"d/{i}", i, f"{i:032x}")
        b.put(f"d/{i}", i, f"{i:032x}")
    b.put("d/5", 5, "f" * 32)  # content differs
    b.remove("d/6")  # missing
    b.put("extra", 1, "0" * 32)  # only in b
    found = compare(a, b)
    assert found.keys == ["d/5", "d/6", "extra"]
    assert found.nodes_compared <= 3 * 2 * (a.depth + 1)
    assert compare(a, a).nodes_compared == 1
