"""Shipper and sink in-process, through region b's real vault (SeaweedFS), with real keys."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from agent.config import AgentConfig, StreamConfig, SyntheticOptions
from agent.lab.stream_rig import lab_shipper, lab_sink
from replicators.errors import IntegrityError, KeyAccessError
from replicators.keys import KeyProvider, build_key_provider
from replicators.metrics import Metrics
from replicators.s3 import S3Store
from replicators.shipper import Shipper
from replicators.sink import HOLE_PATIENCE, Sink
from replicators.synthetic import SyntheticSource, SyntheticTarget, parse_record, read_applied_log
from replicators.vault import SegmentRef, Vault

pytestmark = pytest.mark.lab


@dataclass
class Rig:
    stream: str
    vault: Vault
    send_keys: KeyProvider
    recv_keys: KeyProvider
    workdir: Path
    metrics: Metrics

    def shipper(
        self,
        rate: float = 2000.0,
        max_age: float = 0.05,
        size: int = 64,
        state: str = "shipped",
        in_flight: int = 1,
    ) -> Shipper:
        cfg = StreamConfig(
            name=self.stream,
            kind="synthetic",
            synthetic=SyntheticOptions(rate=rate, record_size=size),
        )
        return lab_shipper(
            self.stream, "synthetic", SyntheticSource(cfg.synthetic), self.vault,
            self.send_keys, self.workdir / f"{state}.json", self.metrics,
            segment_max_bytes=1 << 20, max_age=max_age, in_flight=in_flight,
        )  # fmt: skip

    def sink(self) -> tuple[Sink, SyntheticTarget]:
        target = SyntheticTarget(self.workdir / "target")
        sink = lab_sink(self.stream, "synthetic", target, self.vault, self.recv_keys, self.metrics)
        return sink, target


@pytest_asyncio.fixture(loop_scope="session")
async def rig(
    cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> AsyncIterator[Rig]:
    peer_b = cfg_a.peers[0]
    store = await S3Store.open(peer_b.vault)
    send, recv = build_key_provider(peer_b.keys), build_key_provider(cfg_b.keys)
    try:
        yield Rig(unique, Vault(store), send, recv, tmp_path, Metrics(CollectorRegistry()))
    finally:
        await send.aclose()
        await recv.aclose()
        await store.aclose()


async def ship_for(shipper: Shipper, seconds: float) -> None:
    stop = asyncio.Event()
    await shipper.recover()

    async def loop() -> None:
        while await shipper.sync_once(stop):
            pass

    task = asyncio.create_task(loop())
    await asyncio.sleep(seconds)
    stop.set()
    async with asyncio.timeout(10):
        await task


def indices(target: SyntheticTarget) -> list[int]:
    return [parse_record(r)[0] for r in read_applied_log(target.log_path)]


async def vault_refs(rig: Rig) -> list[SegmentRef]:
    return [r async for r in rig.vault.segments(rig.stream)]


async def test_every_record_arrives_once_in_order(rig: Rig) -> None:
    shipper = rig.shipper()
    await ship_for(shipper, 1.0)
    assert shipper.end > 100
    assert not shipper.progress.pending()  # drained: everything captured is durable
    sink, target = rig.sink()
    await sink.recover()
    applied = await sink.sync_once(asyncio.Event())
    assert applied == len(await vault_refs(rig)) > 1
    assert indices(target) == list(range(shipper.end))
    assert sink.progress.marks["applied"].position == shipper.end


async def test_restart_adopts_published_segment_missing_from_checkpoint(rig: Rig) -> None:
    first = rig.shipper()
    await ship_for(first, 0.5)
    saved = (rig.workdir / "shipped.json").read_text()
    await ship_for(rig.shipper(), 0.3)
    # a crash after publishing but before the checkpoint: the checkpoint is behind the vault
    (rig.workdir / "shipped.json").write_text(saved)
    resumed = rig.shipper()
    await ship_for(resumed, 0.3)
    sink, target = rig.sink()
    await sink.recover()
    await sink.sync_once(asyncio.Event())
    assert indices(target) == list(range(resumed.end))


async def test_sink_resumes_after_crash_between_apply_and_state(rig: Rig) -> None:
    shipper = rig.shipper()
    await ship_for(shipper, 0.5)
    sink, target = rig.sink()
    await sink.recover()
    await sink.sync_once(asyncio.Event())
    state = target.state_path.read_text()
    await ship_for(rig.shipper(), 0.3)
    await sink.sync_once(asyncio.Event())
    target.state_path.write_text(state)  # the log holds more than the state says
    again, target2 = rig.sink()
    await again.recover()
    await again.sync_once(asyncio.Event())
    assert indices(target2) == list(range(again.last.end if again.last else 0))


async def test_tampered_segment_halts_the_sink_before_applying(rig: Rig) -> None:
    await ship_for(rig.shipper(), 0.6)
    refs = await vault_refs(rig)
    assert len(refs) >= 3
    victim = refs[1]
    blob = bytearray(await rig.vault.get_segment(victim))
    blob[len(blob) // 2] ^= 0x01
    await rig.vault.store.put(victim.key, bytes(blob))
    sink, target = rig.sink()
    await sink.recover()
    with pytest.raises(IntegrityError):
        await sink.sync_once(asyncio.Event())
    state = await target.state()
    assert state is not None and state.ref == refs[0]
    assert sink.metrics._m.segments.labels(rig.stream, "vault", "rejected")._value.get() == 1


async def test_missing_segment_is_a_gap(rig: Rig) -> None:
    await ship_for(rig.shipper(), 0.6)
    refs = await vault_refs(rig)
    await rig.vault.store.delete(refs[1].key)
    sink, _ = rig.sink()
    await sink.recover()
    # a pipelining shipper's PUTs may land out of order: the sink waits for the missing one
    assert await sink.sync_once(asyncio.Event()) == 1
    assert sink.last is not None and sink.last.ref == refs[0]
    # ...for HOLE_PATIENCE seconds; then it is lost, and the stream halts naming it
    assert sink._hole_since is not None
    sink._hole_since -= HOLE_PATIENCE
    with pytest.raises(IntegrityError, match=f"expected seq {refs[1].seq}"):
        await sink.sync_once(asyncio.Event())


async def test_segment_sealed_for_another_region_is_rejected(rig: Rig, cfg_a: AgentConfig) -> None:
    wrong = build_key_provider(cfg_a.keys)  # region a's own key, not b's
    try:
        rig.send_keys = wrong
        await ship_for(rig.shipper(), 0.2)
    finally:
        await wrong.aclose()
    sink, target = rig.sink()
    await sink.recover()
    # b cannot unwrap a key it does not hold: refused, nothing applied
    with pytest.raises((IntegrityError, KeyAccessError)):
        await sink.sync_once(asyncio.Event())
    assert await target.state() is None


@pytest.mark.parametrize("in_flight", [1, 4], ids=["one-put", "pipelined"])
async def test_seeded_store_faults_lose_and_duplicate_nothing(rig: Rig, in_flight: int) -> None:
    """20% of vault calls fail, half of them after the write happened; the loop recovers.
    Pipelined, a PUT that fails before a later one lands leaves a hole that recovery
    clears (the later ones are sent again after it)."""
    from agent.backoff import Backoff
    from agent.supervise import StreamTask, run_stream
    from tests.faulty_store import FaultyStore

    faulty = FaultyStore(rig.vault.store, rate=0.2, seed=7)
    rig.vault = Vault(faulty)
    shipper = rig.shipper(rate=1000.0, max_age=0.02, in_flight=in_flight)
    sink, target = rig.sink()
    stop = asyncio.Event()
    tasks = [
        StreamTask("ship", shipper, shipper.progress, backoff=Backoff(base=0.01, cap=0.05)),
        StreamTask("sink", sink, sink.progress, idle=0.05, backoff=Backoff(base=0.01, cap=0.05)),
    ]
    async with asyncio.TaskGroup() as tg:
        for t in tasks:
            tg.create_task(run_stream(t, stop, rig.metrics))
        await asyncio.sleep(2.0)
        stop.set()
    assert faulty.injected > 5
    faulty.rate = 0.0
    final, final_target = rig.sink()
    await final.recover()
    await final.sync_once(asyncio.Event())
    shipped = [parse_record(r)[0] for r in read_applied_log(final_target.log_path)]
    assert shipped == list(range(len(shipped)))
    assert len(shipped) >= shipper.end > 200
    assert target.log_path == final_target.log_path


async def test_two_shippers_racing_one_sequence_number_never_merge_silently(rig: Rig) -> None:
    """Two writers of one stream and epoch (two agents left active in one region): the
    first time one finds its sequence number taken by a segment that is not its own, it
    halts with an integrity error; the log holds each position once, in order."""
    from agent.backoff import Backoff
    from agent.supervise import StreamTask, run_stream

    one = rig.shipper(rate=1500.0, size=64, state="one")
    two = rig.shipper(rate=1700.0, size=65, state="two")
    tasks = [
        StreamTask(name, s, s.progress, backoff=Backoff(base=0.01, cap=0.05))
        for name, s in (("one", one), ("two", two))
    ]
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        for t in tasks:
            tg.create_task(run_stream(t, stop, rig.metrics))
        await asyncio.sleep(2.0)
        stop.set()
    halted = [t for t in tasks if t.state == "halted"]
    assert len(halted) == 1, [(t.name, t.state, t.last_error) for t in tasks]
    assert "two writers of one stream" in (halted[0].last_error or "")
    sink, target = rig.sink()
    await sink.recover()
    await sink.sync_once(asyncio.Event())
    shipped = indices(target)
    assert shipped == list(range(len(shipped))) and len(shipped) > 100


async def test_a_shipper_of_an_older_epoch_halts_on_a_newer_one_in_the_log(rig: Rig) -> None:
    await ship_for(rig.shipper(), 0.3)
    newer = await vault_refs(rig)
    blob = await rig.vault.get_segment(newer[-1])
    # a newer epoch's segment in the log (copied under its name: only the name is read)
    await rig.vault.store.put(SegmentRef(2, newer[-1].seq + 1, rig.stream).key, blob)
    stale = rig.shipper(state="stale")
    with pytest.raises(IntegrityError, match="a newer lease holder ships this stream"):
        await stale.recover()


async def test_segments_of_a_superseded_epoch_are_quarantined_never_applied(
    rig: Rig, cfg_b: AgentConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """A holder of epoch 1 keeps shipping after epoch 2 began at the seq after the last one
    the new holder adopted: its segments, listed before or after the sink moved on, are
    quarantined (counted, named in /status), and the log applies without a gap."""
    import dataclasses

    from replicators import sink as sink_module

    old = rig.shipper(rate=1000.0)
    await ship_for(old, 0.3)
    adopted = (rig.workdir / "shipped.json").read_text()
    (rig.workdir / "new.json").write_text(adopted)
    new = rig.shipper(rate=1000.0, state="new")
    new.settings = dataclasses.replace(new.settings, epoch=2)
    await ship_for(new, 0.3)
    # the old holder, paused before and unaware, publishes once more (no recover)
    assert await old.sync_once(asyncio.Event())
    stale_key = old.last.key if old.last else ""
    assert stale_key.split("/")[2] == f"{1:010d}"
    sink, target = rig.sink()
    await sink.recover()
    await sink.sync_once(asyncio.Event())
    assert list(sink.progress.quarantined) == [stale_key]
    assert indices(target) == list(range(new.end))
    # it publishes again, after the sink moved past epoch 1: found by the late check
    assert await old.sync_once(asyncio.Event())
    late_key = old.last.key if old.last else ""
    sink._late_checked -= sink_module.LATE_CHECK_EVERY
    await sink.sync_once(asyncio.Event())
    assert list(sink.progress.quarantined) == [stale_key, late_key]
    assert sink.metrics._m.segments.labels(rig.stream, "vault", "quarantined")._value.get() == 2
    assert indices(target) == list(range(new.end))
    # dragent vault verify names both and still verifies the chain
    from agent.vaultcmd import vault_verify

    capsys.readouterr()
    assert await vault_verify(cfg_b, rig.stream, as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["stale"] == [stale_key, late_key]


async def test_every_restore_reads_the_log_through_one_checked_walk(rig: Rig) -> None:
    """replicators.logread: a missing segment is a gap, a copy under another epoch's
    name is refused, a superseded segment is left out and named."""
    from replicators.logread import LogWalk

    await ship_for(rig.shipper(), 0.5)
    refs = await vault_refs(rig)
    walk = LogWalk(rig.vault, rig.recv_keys, rig.stream)
    assert [ref async for ref, _ in walk.read()] == refs
    # a copy of the last segment under epoch 2 and the same seq supersedes it: left out,
    # and the copy itself is refused (its header says epoch 1)
    copy = SegmentRef(2, refs[-1].seq, rig.stream)
    await rig.vault.store.put(copy.key, await rig.vault.get_segment(refs[-1]))
    with pytest.raises(IntegrityError, match="epoch"):
        _ = [ref async for ref, _ in walk.read()]
    assert walk.stale == [refs[-1]]
    await rig.vault.store.delete(copy.key)
    await rig.vault.store.delete(refs[1].key)
    with pytest.raises(IntegrityError, match=f"expected seq {refs[1].seq}"):
        _ = [ref async for ref, _ in walk.read()]


async def test_vault_verify_names_every_damaged_segment(
    rig: Rig, cfg_b: AgentConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.vaultcmd import _walk, vault_verify

    await ship_for(rig.shipper(), 0.6)
    refs = await vault_refs(rig)
    assert len(refs) >= 5
    clean = (await _walk(cfg_b, rig.stream, verify=True)).rows
    assert [r["seq"] for r in clean] == [r.seq for r in refs]
    victims = [refs[0], refs[2], refs[-1]]
    for ref in victims:
        blob = bytearray(await rig.vault.get_segment(ref))
        blob[len(blob) // 2] ^= 0x04
        await rig.vault.store.put(ref.key, bytes(blob))
    capsys.readouterr()
    assert await vault_verify(cfg_b, rig.stream, as_json=True) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["damaged"] == sorted(r.key for r in victims)
    assert report["segments"] == len(refs) - 3 and not report["ok"]
    # each names the positions it lies between (the readable neighbours' ends)
    covers = {p["segment"]: p["covers"] for p in report["problems"]}
    assert covers[victims[0].key] == [None, clean[1]["start"]]
    assert covers[victims[1].key] == [clean[1]["end"], clean[3]["start"]]
    assert covers[victims[2].key] == [clean[-2]["end"], None]


async def test_an_oversized_object_under_a_segment_name_is_refused_unread(rig: Rig) -> None:
    from replicators.sink import SinkSettings

    await ship_for(rig.shipper(), 0.3)
    refs = await vault_refs(rig)
    big = SegmentRef(refs[-1].epoch, refs[-1].seq + 1, rig.stream)
    await rig.vault.store.put(big.key, b"\0" * (3 << 20))  # 3 MiB of nothing
    sink, target = rig.sink()
    sink.settings = SinkSettings(rig.stream, "vault", max_segment_bytes=1 << 20)
    await sink.recover()
    with pytest.raises(IntegrityError, match="more than the 1048576 allowed here: not read"):
        await sink.sync_once(asyncio.Event())
    assert indices(target) == list(range(indices(target)[-1] + 1))  # the rest applied


class IgnoresCreateOnly:
    """A store that drops ``if_absent`` (as a server without conditional writes does;
    none here lacks them, so this small wrapper plays one)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    async def put(self, key: str, data: bytes, **kwargs: object) -> None:
        kwargs.pop("if_absent", None)
        await self.inner.put(key, data, **kwargs)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_a_vault_that_ignores_create_only_writes_is_refused(rig: Rig) -> None:
    from replicators.vault import PROBE_PREFIX, check_create_only

    await check_create_only(rig.vault.store)  # SeaweedFS honours If-None-Match: *
    with pytest.raises(IntegrityError, match="ignores If-None-Match"):
        await check_create_only(IgnoresCreateOnly(rig.vault.store))  # type: ignore[arg-type]
    left = [i.key async for i in rig.vault.store.list(PROBE_PREFIX)]
    assert left == []  # the probes are removed
