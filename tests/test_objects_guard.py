"""The objects mirror's mass-delete guard (docs/objects-guard.md).

Without the lab: the window/threshold decision (``replicators.objects.guard``) and the
mirror target's hold over an in-memory bucket (held deletes, puts that supersede them,
a restart, approve and reject). On the lab (real SeaweedFS, region a → b): a script
deleting 20 % of a bucket; a source pointed at a prefix that lists empty; the
``dragent objects deletes`` commands; the verify's accepted differences.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import tomli_w

from agent.config import AgentConfig
from agent.lab import Lab
from replicators.errors import NotFound
from replicators.objects import held
from replicators.objects import records as rec
from replicators.objects.guard import DeleteWindow, GuardPolicy
from replicators.objects.mirror import MirrorTarget
from replicators.objects.options import ObjectsOptions
from replicators.segment import SegmentHeader
from replicators.vault import SegmentRef
from tests.support import eventually

# -- the decision (pure) -------------------------------------------------------------------


def test_limit_is_the_share_of_the_mirror_between_min_deletes_and_count() -> None:
    p = GuardPolicy(share=0.05, count=10_000, window=600, min_deletes=100)
    assert p.limit(0) == 100  # a small bucket: min_deletes
    assert p.limit(1_000) == 100
    assert p.limit(100_000) == 5_000  # 5 %
    assert p.limit(10_000_000) == 10_000  # the count caps it


def test_window_trips_on_the_delete_that_would_exceed_the_share() -> None:
    w = DeleteWindow(GuardPolicy(share=0.05, count=10_000, window=600, min_deletes=0))
    keys = 100
    for i in range(5):
        assert w.trips(1000.0 + i, keys) is None
        w.record(1000.0 + i, f"k{i}")
        keys -= 1  # the base stays 100: keys now plus the window's deletes
    why = w.trips(1010.0, keys)
    assert why is not None and "6 deletes" in why and "5.0% of the mirror's 100 keys" in why


def test_window_slides_and_counts_only_recent_deletes() -> None:
    w = DeleteWindow(GuardPolicy(share=1.0, count=3, window=60, min_deletes=0))
    for t in (0.0, 10.0, 20.0):
        assert w.trips(t, 1000) is None
        w.record(t, "k")
    assert w.trips(30.0, 1000) is not None  # a fourth within 60 s
    assert "the count 3" in (w.trips(30.0, 1000) or "")
    assert w.trips(60.5, 1000) is None  # the first one left the window
    assert len(w) == 2


def test_min_deletes_spares_small_buckets_and_disabled_never_trips() -> None:
    w = DeleteWindow(GuardPolicy(share=0.05, count=10_000, window=600, min_deletes=100))
    for i in range(100):
        assert w.trips(float(i), 40) is None  # all 40 keys and more: under min_deletes
        w.record(float(i), f"k{i}")
    assert w.trips(100.0, 0) is not None
    off = DeleteWindow(GuardPolicy(count=1, min_deletes=0, enabled=False), [(0.0, "a")] * 5)
    assert off.trips(1.0, 10) is None


def test_window_restored_from_entries_is_sorted_and_pruned() -> None:
    w = DeleteWindow(GuardPolicy(window=10), [(5.0, "b"), (1.0, "a")])
    assert w.keys() == ["a", "b"]
    w.prune(12.0)
    assert w.keys() == ["b"]


# -- the target's hold, over an in-memory bucket ------------------------------------------


class MemBucket:
    """Just enough of ``Bucket`` for ``MirrorTarget``: key → (body, metadata)."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, dict[str, str]]] = {}

    async def head(self, key: str) -> Any:
        if key not in self.objects:
            raise NotFound("absent", key=key)
        return argparse.Namespace(metadata=self.objects[key][1])

    async def write(self, key: str, body: bytes, content_type: str, meta: dict[str, str]) -> None:
        self.objects[key] = (body, dict(meta))

    async def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    async def scan(self) -> AsyncIterator[list[Any]]:
        keys = sorted(self.objects)
        for i in range(0, len(keys), 1000):
            yield [argparse.Namespace(key=k) for k in keys[i : i + 1000]]

    async def abort_upload(self, key: str, upload_id: str) -> None:
        pass

    async def aclose(self) -> None:
        pass


def _header(start: int, end: int) -> SegmentHeader:
    return SegmentHeader(
        version=1, stream="s", epoch=1, seq=1, start=str(start), end=str(end),
        first_source_time=0.0, last_source_time=0.0, record_count=end - start, created_at=0.0,
        key_id="k", wrapped_key=b"", salt=b"", commitment=b"", frame_size=64,
    )  # fmt: skip


def _put(key: str, seq: int, body: bytes = b"x") -> bytes:
    head = rec.Head(len(body), "", {}, rec.content_hash(body))
    return rec.encode(rec.Put(key, rec.Version(seq, seq), head, body))


def _delete(key: str, seq: int) -> bytes:
    return rec.encode(rec.Delete(key, rec.Version(seq, seq)))


class Feed:
    """Segments for a target, numbered and positioned as a sink would hand them over."""

    def __init__(self, stream: str = "s") -> None:
        self.stream = stream
        self.seq = 0
        self.pos = 0

    async def apply(self, target: MirrorTarget, records: list[bytes]) -> None:
        self.seq += 1
        ref = SegmentRef(epoch=1, seq=self.seq, stream=self.stream)
        await target.apply(ref, _header(self.pos, self.pos + len(records)), records)
        self.pos += len(records)


POLICY = GuardPolicy(share=0.1, count=10_000, window=600, min_deletes=0)


async def _filled(
    tmp_path: Path, n: int = 50, stream: str = "s"
) -> tuple[MemBucket, MirrorTarget, Feed]:
    bucket, feed = MemBucket(), Feed(stream)
    target = MirrorTarget(bucket, tmp_path, POLICY)  # type: ignore[arg-type]
    await feed.apply(target, [_put(f"k{i:02d}", 1 + i) for i in range(n)])
    return bucket, target, feed


async def test_a_mass_delete_is_held_puts_flow_and_a_put_supersedes_its_delete(
    tmp_path: Path,
) -> None:
    bucket, target, feed = await _filled(tmp_path)
    await feed.apply(target, [_delete(f"k{i:02d}", 100 + i) for i in range(20)])
    assert target.hold is not None and "exceed 5" in target.hold["reason"]
    assert target.held_count() == 15 and len(bucket.objects) == 45
    assert target.hold["applied_before"] == [f"k{i:02d}" for i in range(5)]
    # puts keep flowing; a put of a held key supersedes its held delete; deletes stay held
    await feed.apply(target, [_put("new", 200), _put("k19", 201, b"again"), _delete("k30", 202)])
    assert bucket.objects["k19"][0] == b"again" and "new" in bucket.objects
    assert "k30" in bucket.objects and "k19" not in target.held
    assert target.held_count() == 15
    saved = held.read_guard(tmp_path)
    assert [d["key"] for d in saved["held"]][-1] == "k30"
    first = saved["held"][0]
    assert (first["key"], first["version"], first["position"]) == ("k05", "105.105", 55)
    assert first["segment"] == SegmentRef(epoch=1, seq=2, stream="s").key
    # a restart keeps them held, neither lost nor decided again
    again = MirrorTarget(bucket, tmp_path, POLICY)  # type: ignore[arg-type]
    assert again.hold == target.hold and again.held_count() == 15
    await feed.apply(again, [_delete("k40", 300)])
    assert again.held_count() == 16 and "k40" in bucket.objects
    # approve: in order, the held keys are deleted; the hold and the window are cleared
    held.request(tmp_path, "approve", again.hold["id"])  # type: ignore[index]
    await feed.apply(again, [_put("after", 400)])
    assert again.hold is None and again.held_count() == 0
    assert not (tmp_path / held.DECISION_FILE).exists()
    gone = [f"k{i:02d}" for i in range(19)] + ["k30", "k40"]
    assert not set(gone) & set(bucket.objects)
    assert {"k19", "new", "after"} <= set(bucket.objects)
    assert held.read_guard(tmp_path)["hold"] is None


async def test_reject_keeps_the_keys_and_records_them(tmp_path: Path) -> None:
    bucket, target, feed = await _filled(tmp_path)
    await feed.apply(target, [_delete(f"k{i:02d}", 100 + i) for i in range(50)])
    assert target.held_count() == 45
    hold_id = target.hold["id"]  # type: ignore[index]
    held.request(tmp_path, "reject", "some-other-hold")  # a stale decision: ignored
    await feed.apply(target, [])
    assert target.held_count() == 45
    held.request(tmp_path, "reject", hold_id)
    await target.state()  # starts the watcher: the decision is carried out without a segment
    await eventually(lambda: target.hold is None, within=10)
    assert len(bucket.objects) == 45
    rejected = held.rejected(tmp_path)
    assert set(rejected) == {f"k{i:02d}" for i in range(5, 50)}
    assert rejected["k07"]["hold"] == hold_id and rejected["k07"]["version"] == "107.107"
    # the window starts afresh: a few deletes pass again
    await feed.apply(target, [_delete("k05", 500)])
    assert "k05" not in bucket.objects and target.hold is None
    await target.aclose()


async def test_gauge_reports_held_deletes_per_stream(tmp_path: Path) -> None:
    _, target, feed = await _filled(tmp_path, stream="gauged")
    await feed.apply(target, [_delete(f"k{i:02d}", 100 + i) for i in range(10)])
    samples = {
        s.labels["stream"]: s.value
        for m in held.COLLECTOR.collect()
        for s in m.samples
        if m.name == "dragent_objects_deletes_held"
    }
    assert samples.get("gauged") == 5.0
    await target.aclose()
    assert "gauged" not in {s.labels["stream"] for m in held.COLLECTOR.collect() for s in m.samples}


async def test_disabled_guard_applies_every_delete(tmp_path: Path) -> None:
    bucket, feed = MemBucket(), Feed()
    off = GuardPolicy(enabled=False)
    target = MirrorTarget(bucket, tmp_path, off)  # type: ignore[arg-type]
    await feed.apply(target, [_put(f"k{i}", 1 + i) for i in range(300)])
    await feed.apply(target, [_delete(f"k{i}", 1000 + i) for i in range(300)])
    assert bucket.objects == {} and target.hold is None


def test_options_table() -> None:
    s3 = {"endpoint": "http://127.0.0.1:1", "bucket": "b"}
    opts = ObjectsOptions.model_validate(
        {"source": s3, "mirror": s3, "delete_guard": {"share": 0.2, "window": "5m"}}
    )
    assert opts.delete_guard.policy() == GuardPolicy(0.2, 10_000, 300.0, 100, True)
    assert ObjectsOptions.model_validate({"source": s3, "mirror": s3}).delete_guard.enabled
    with pytest.raises(ValueError):
        ObjectsOptions.model_validate({"source": s3, "mirror": s3, "delete_guard": {"x": 1}})


# -- on the lab ----------------------------------------------------------------------------

GUARDED = {"share": 0.05, "count": 10_000, "window": "10m", "min_deletes": 0}


class Harness:
    """The objects rig (tests.test_objects_rig) with a guarded mirror target, and a config
    of region b whose data_dir holds that target's directory (for the CLI and verify)."""

    def __init__(self, lab: Lab, name: str, opts: ObjectsOptions, tmp: Path, cfg: Any) -> None:
        from tests.test_objects_rig import Rig

        self.lab, self.name, self.opts, self.tmp = lab, name, opts, tmp
        self.rig = Rig(name, opts, cfg[0], cfg[1], tmp / "rig")
        self.data_dir = tmp / "b-data"
        self.target_dir = tmp / "rig" / "dst"
        self.target_dir.mkdir(parents=True)
        link = self.data_dir / "streams" / name / "target"
        link.parent.mkdir(parents=True)
        link.symlink_to(self.target_dir)
        self.config = self._config(cfg[1])

    def _config(self, cfg_b: AgentConfig) -> Path:
        from tests.test_objects_rig import s3

        data = tomllib.loads(self.lab.config_path("b").read_text())
        data["data_dir"] = str(self.data_dir)
        prefix = self.opts.source.prefix
        objects = {
            "source": s3(self.lab, "a", prefix),
            "mirror": s3(self.lab, "b", prefix),
            "inline_max": "1MiB",
            "delete_guard": GUARDED,
        }
        data["streams"] = [{"name": self.name, "kind": "objects", "objects": objects}]
        path = self.tmp / "b.toml"
        path.write_text(tomli_w.dumps(data))
        return path

    def running(self, opts: ObjectsOptions | None = None) -> Any:
        """Shipper and sink; ``opts``: other source options (the same state directories)."""
        import tests.test_objects_rig as rig_module

        rig = self.rig
        if opts is not None:
            rig = rig_module.Rig(self.name, opts, rig.cfg_a, rig.cfg_b, rig.workdir)
        policy = self.opts.delete_guard.policy()
        original = rig_module.MirrorTarget

        def guarded(bucket: Any, state_dir: Path) -> MirrorTarget:
            return original(bucket, state_dir, policy)

        self._patch = pytest.MonkeyPatch()
        self._patch.setattr(rig_module, "MirrorTarget", guarded)
        return rig.running()

    def unpatch(self) -> None:
        self._patch.undo()

    async def cli(self, *argv: str) -> int:
        from agent import cli_objects

        parser = argparse.ArgumentParser()
        cli_objects.register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["objects", "deletes", *argv, "--config", str(self.config)])
        return await asyncio.to_thread(args.func, args)


@pytest_asyncio.fixture(loop_scope="session")
async def harness(
    lab: Lab, cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> AsyncIterator[Harness]:
    from tests.test_objects_rig import options

    opts = options(lab, f"{unique}/", scan_interval=0.5, delete_guard=GUARDED)
    yield Harness(lab, unique, opts, tmp_path, (cfg_a, cfg_b))


async def _keys(bucket: Any) -> set[str]:
    return {obj.key async for page in bucket.scan() for obj in page}


async def _fill(src: Any, dst: Any, n: int) -> None:
    await asyncio.gather(
        *(src.write(f"k/{i:03d}", os.urandom(200), "text/plain", {"i": str(i)}) for i in range(n))
    )


def _gauge(stream: str) -> float | None:
    for m in held.COLLECTOR.collect():
        for s in m.samples:
            if s.labels.get("stream") == stream:
                return s.value
    return None


@pytest.mark.lab
async def test_a_script_deleting_a_fifth_is_held_then_approved(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = await harness.rig.source_bucket(), await harness.rig.mirror_bucket()
    try:
        await _fill(src, dst, 100)
        async with harness.running() as (_, sink):
            await eventually(lambda: _has(dst, 100), within=60, every=0.5)
            doomed = [f"k/{i:03d}" for i in range(0, 100, 5)]  # 20 %, one key in five
            await asyncio.gather(*(src.delete(k) for k in doomed))
            target: MirrorTarget = sink.target  # type: ignore[assignment]
            await eventually(lambda: target.held_count() == 15, within=60, every=0.3)
            assert (
                target.hold is not None
                and "5.0% of the mirror's 100 keys" in (target.hold["reason"])
            )
            assert len(target.hold["applied_before"]) == 5
            left = await _keys(dst)
            assert len(set(doomed) & left) == 15  # the mirror keeps them
            assert _gauge(harness.name) == 15.0  # DragentObjectsDeletesHeld fires on > 0
            # puts to other keys keep flowing; a held key put again supersedes its delete
            await src.write("other/new", b"fresh", "text/plain", {})
            again = sorted(set(doomed) & left)[0]
            await src.write(again, b"back", "text/plain", {})
            await eventually(lambda: _holds(dst, again, b"back"), within=60, every=0.3)
            await eventually(lambda: _has_keys(dst, {"other/new"}), within=60, every=0.3)
            assert target.held_count() == 14
            # the position advances: the held deletes are in segments the sink has applied
            guard = held.read_guard(harness.target_dir)
            assert max(d["position"] for d in guard["held"]) < sink.last.end  # type: ignore[union-attr]
            assert await harness.cli("status") == 0
            assert "14 deletes held" in capsys.readouterr().out
            assert await harness.cli("approve", "--wait", "30") == 0
            assert target.hold is None and _gauge(harness.name) == 0.0
            remaining = await _keys(dst)
            assert not (set(doomed) - {again}) & remaining
            assert {again, "other/new"} <= remaining and len(remaining) == 82
            assert await harness.cli("approve", "--wait", "0") == 1  # nothing held now
    finally:
        harness.unpatch()
        await src.aclose()
        await dst.aclose()


@pytest.mark.lab
async def test_reject_keeps_the_mirror_and_verify_accepts_the_difference(
    harness: Harness, cfg_b: AgentConfig
) -> None:
    from agent.config import load_config
    from replicators.objects.kind import verify
    from verifiers.report import check, load_or_create_signing_key, sign

    src, dst = await harness.rig.source_bucket(), await harness.rig.mirror_bucket()
    try:
        await _fill(src, dst, 100)
        async with harness.running() as (_, sink):
            await eventually(lambda: _has(dst, 100), within=60, every=0.5)
            doomed = [f"k/{i:03d}" for i in range(20)]
            await asyncio.gather(*(src.delete(k) for k in doomed))
            target: MirrorTarget = sink.target  # type: ignore[assignment]
            await eventually(lambda: target.held_count() == 15, within=60, every=0.3)
            kept = set(doomed) & await _keys(dst)
            saved = lambda: len(held.read_guard(harness.target_dir)["held"]) == 15  # noqa: E731
            await eventually(saved, within=10)
            cfg = load_config(harness.config)
            (stream,) = cfg.streams
            # undecided: a verify with repair reports the held keys and does not delete them
            pending = await verify(stream, cfg, repair=True)
            assert not pending["ok"] and pending["repaired"] == 0
            assert {d["where"] for d in pending["differences"]} == kept
            assert all("held by the mass-delete guard" in d["why"] for d in pending["differences"])
            assert kept <= await _keys(dst)
            assert await harness.cli("reject", "--wait", "30") == 0
            assert target.hold is None and kept <= await _keys(dst)
        report = await verify(stream, cfg, repair=True)
        assert report["ok"] and report["differences"] == [] and report["repaired"] == 0
        assert sorted(a["where"] for a in report["accepted"]) == sorted(kept)
        assert all(a["what"] == "not in the source" for a in report["accepted"])
        assert "15 accepted" in report["summary"]
        assert kept <= await _keys(dst)  # repair left them
        key = load_or_create_signing_key(harness.tmp / "signing.pem")
        signed = sign(report, key)
        check(signed, key.public_key())
    finally:
        harness.unpatch()
        await src.aclose()
        await dst.aclose()


@pytest.mark.lab
async def test_a_source_that_lists_empty_trips_the_guard_and_a_restart_keeps_the_hold(
    harness: Harness, lab: Lab
) -> None:
    from tests.test_objects_rig import options

    src, dst = await harness.rig.source_bucket(), await harness.rig.mirror_bucket()
    try:
        await _fill(src, dst, 60)
        async with harness.running():
            await eventually(lambda: _has(dst, 60), within=60, every=0.5)
        harness.unpatch()
        # the source now points at a prefix that lists empty (a wrong prefix, an unmounted
        # volume): its first scan finds every shipped key gone and ships 60 deletes
        empty = options(lab, f"{harness.name}-empty/", scan_interval=0.5, delete_guard=GUARDED)
        empty = empty.model_copy(update={"mirror": harness.opts.mirror})
        async with harness.running(empty) as (_, sink):
            target: MirrorTarget = sink.target  # type: ignore[assignment]
            await eventually(lambda: target.held_count() == 57, within=60, every=0.3)
            hold = target.hold
            assert hold is not None and len(await _keys(dst)) == 57
        harness.unpatch()
        # a restart of the sink: the same hold, the same held deletes, nothing re-decided
        async with harness.running(empty) as (_, sink):
            again: MirrorTarget = sink.target  # type: ignore[assignment]
            assert again.hold == hold and again.held_count() == 57
            await asyncio.sleep(2)
            assert len(await _keys(dst)) == 57
            assert await harness.cli("reject", "--wait", "30") == 0
            assert again.hold is None and len(await _keys(dst)) == 57
    finally:
        harness.unpatch()
        await src.aclose()
        await dst.aclose()


async def _has(bucket: Any, n: int) -> bool:
    return len(await _keys(bucket)) == n


async def _holds(bucket: Any, key: str, body: bytes) -> bool:
    try:
        return bool(await bucket.read(key, "") == body)
    except NotFound:
        return False


async def _has_keys(bucket: Any, keys: set[str]) -> bool:
    return keys <= await _keys(bucket)
