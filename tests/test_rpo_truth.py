"""The RPO never lies: a broken PostgreSQL stream's RPO grows with wall time.

A real WAL source on the lab's primary ships through ``agent.supervise.run_stream``
into region b's real vault (SeaweedFS). The stream is broken three ways: the
vault refuses the credentials (an agent restarted with a wrong secret), the
vault is unreachable (a closed port), and the replication slot is dropped while
the stream is down (the source re-seeds with a recorded gap, and the vault cannot
restore past it until a base backup is taken after it). Each time the RPO gauge
(the Prometheus collector), the ``/status`` snapshot and the compliance control
must show an RPO growing with wall time; once healed, it falls back under a second.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from agent.backoff import Backoff
from agent.collector import ProgressCollector
from agent.compliance import controls as c
from agent.config import AgentConfig, StreamConfig
from agent.lab import Lab
from agent.lab.stream_rig import lab_shipper
from agent.supervise import StreamTask
from replicators.keys import KeyProvider, build_key_provider, unseal
from replicators.postgres.gaps import GapBook
from replicators.postgres.kind import BackupSchedule
from replicators.postgres.lsn import GAP, unpack_gap
from replicators.postgres.options import PostgresOptions
from replicators.postgres.restore import RestoreTarget, WalGapError, fill_spool
from replicators.postgres.spool import WalSpool, decode_records
from replicators.postgres.walsource import WalSource
from replicators.s3 import S3Store
from replicators.settings import Secret
from replicators.store import ObjectInfo, ObjectStore
from replicators.vault import Vault
from tests.support import eventually, running

pytestmark = pytest.mark.lab

BROKEN_FOR = 4.0  # seconds a stream stays broken before the RPO is checked


class Switch:
    """An ``ObjectStore`` that forwards every call to whichever real store is plugged in."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def put(self, key: str, data: bytes, **kwargs: Any) -> None:
        await self.store.put(key, data, **kwargs)

    async def get(self, key: str, **kwargs: Any) -> bytes:
        return await self.store.get(key, **kwargs)

    async def stat(self, key: str) -> ObjectInfo:
        return await self.store.stat(key)

    def list(self, prefix: str, *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        return self.store.list(prefix, start_after=start_after)

    async def delete(self, key: str) -> None:
        await self.store.delete(key)

    async def aclose(self) -> None:
        pass


@dataclass
class Rig:
    lab: Lab
    cfg: AgentConfig
    slot: str
    good: S3Store
    wrong_secret: S3Store
    closed_port: S3Store
    keys: KeyProvider
    workdir: Path

    @property
    def options(self) -> PostgresOptions:
        return PostgresOptions(dsn=Secret(self.lab.pg_dsn("a"), "test"), slot=self.slot)

    def book(self, name: str) -> GapBook:
        return GapBook(self.workdir / "gaps", name, "b")

    def task(self, name: str, store: ObjectStore) -> tuple[StreamTask, Switch]:
        switch = Switch(store)
        source = WalSource(self.options, "b", name, self.book(name))
        shipper = lab_shipper(
            name, "postgres", source, Vault(switch), self.keys,
            self.workdir / "shipped.json", max_age=0.1,
        )  # fmt: skip
        backoff = Backoff(base=0.2, cap=1.0)
        return StreamTask(f"{name}->b", shipper, shipper.progress, backoff=backoff), switch


@pytest_asyncio.fixture(loop_scope="session")
async def rig(lab: Lab, cfg_a: AgentConfig, unique: str, tmp_path: Path) -> AsyncIterator[Rig]:
    vault = cfg_a.peers[0].vault
    wrong = vault.model_copy(update={"secret_key": Secret("not-the-secret", "test")})
    closed = vault.model_copy(
        update={"endpoint": f"http://127.0.0.1:{_free_port()}", "max_attempts": 1}
    )
    slot = "dragent_t" + unique.replace("-", "_")[-40:]
    stores = [await S3Store.open(v) for v in (vault, wrong, closed)]
    keys = build_key_provider(cfg_a.peers[0].keys)
    try:
        yield Rig(lab, cfg_a, slot, *stores, keys, tmp_path)
    finally:
        await keys.aclose()
        for store in stores:
            await store.aclose()
        await _sql(lab, _DROP_SLOT, slot)


_DROP_SLOT = (
    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
    "WHERE slot_name = $1 AND NOT active"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _sql(lab: Lab, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(lab.pg_dsn("a"))
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def _dropped(rig: Rig) -> bool:
    await _sql(rig.lab, _DROP_SLOT, rig.slot)
    query = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1"
    return int(await _sql(rig.lab, query, rig.slot)) == 0


def gauge(task: StreamTask, policy: Any) -> float:
    """``dragent_rpo_seconds`` of the task as Prometheus would scrape it."""
    collector = ProgressCollector("a", lambda: [task], lambda: "active", lambda: 1, lambda: policy)
    for family in collector.collect():
        if family.name == "dragent_rpo_seconds":
            return float(family.samples[0].value)
    raise AssertionError("no dragent_rpo_seconds")


def rpo_control(cfg: AgentConfig, live_rpo: Mapping[str, float]) -> str:
    facts = c.Facts(
        now=time.time(), policy=cfg.policy, streams=list(live_rpo), peers=["b"], entries=[],
        live_rpo=live_rpo,
    )  # fmt: skip
    return next(r.status for r in c.evaluate(facts) if r.control == "rpo-within-target")


def healthy(task: StreamTask) -> bool:
    return task.state == "running" and task.progress.rpo(time.time()) < 1.0


async def assert_rpo_grows(task: StreamTask, cfg: AgentConfig, states: tuple[str, ...]) -> None:
    """While broken, the gauge, the snapshot and the control all follow the wall clock."""
    stream = task.progress.stream
    first_at, first = time.time(), gauge(task, cfg.policy)
    await asyncio.sleep(BROKEN_FOR)
    assert task.state in states, (task.state, task.last_error)
    now, later = time.time(), gauge(task, cfg.policy)
    assert later >= BROKEN_FOR, (later, task.last_error)
    assert later - first == pytest.approx(now - first_at, abs=0.5)  # grows with wall time
    snapshot = task.progress.snapshot(time.time())
    assert float(snapshot["rpo_seconds"]) >= later  # type: ignore[arg-type]
    policy = cfg.policy.model_copy(update={"default_rpo_seconds": 1.0, "rpo_seconds": {}})
    assert rpo_control(cfg.model_copy(update={"policy": policy}), {stream: later}) == "fail"


async def test_rpo_grows_while_the_vault_refuses_or_is_unreachable(rig: Rig, unique: str) -> None:
    # an agent (re)started with a wrong secret: nothing was ever captured in this process
    task, switch = rig.task(unique, rig.wrong_secret)
    async with running(task):
        await assert_rpo_grows(task, rig.cfg, ("retrying",))
        assert "AccessDenied" in (task.last_error or "")
        switch.store = rig.good
        await eventually(lambda: healthy(task), within=30)

        # then the vault becomes unreachable mid-stream, with the primary taking writes
        await _sql(rig.lab, "SELECT pg_logical_emit_message(false, 'rpo-test', 'x')")
        switch.store = rig.closed_port
        await assert_rpo_grows(task, rig.cfg, ("retrying",))
        switch.store = rig.good
        await eventually(lambda: healthy(task), within=30)


async def test_a_dropped_slot_is_reseeded_with_a_recorded_gap_and_the_rpo_grows_until_a_backup(
    rig: Rig, unique: str
) -> None:
    task, _ = rig.task(unique, rig.good)
    async with running(task):
        await eventually(lambda: healthy(task), within=30)
    shipped = task.runner.end  # type: ignore[attr-defined]
    # down (its walsender gone): drop the slot, and let the primary move on to later WAL files
    await task.runner.source.aclose()  # type: ignore[attr-defined]
    await eventually(lambda: _dropped(rig), within=10)
    for _ in range(2):
        await _sql(rig.lab, "SELECT pg_logical_emit_message(false, 'rpo-test', 'x')")
        await _sql(rig.lab, "SELECT pg_switch_wal()::text")
    await _sql(rig.lab, "CHECKPOINT")
    async with running(task):
        # re-seeded, never a retry loop: the stream runs on from the new slot's start...
        await eventually(lambda: bool(rig.book(unique).gaps()), within=15)
        [gap] = rig.book(unique).gaps()
        assert gap.start == shipped and gap.end > shipped and gap.covered_by is None
        assert "no longer holds WAL" in gap.reason
        # ...but the vault cannot restore past the gap: the RPO still grows with wall time
        await assert_rpo_grows(task, rig.cfg, ("running",))
        assert await _gap_records(rig, unique) == [(gap.start, gap.end)]
        # a restore to a time after the gap's start says so; one before it is served
        spool = WalSpool(rig.workdir / "restore-spool")
        with pytest.raises(WalGapError, match="the recovery window has a gap"):
            await fill_spool(
                rig.good, rig.keys, unique, spool, from_lsn=0, target=RestoreTarget(time.time())
            )
        assert gap.start_time is not None
        before = RestoreTarget(time=gap.start_time - 2.0)
        await fill_spool(rig.good, rig.keys, unique, spool, from_lsn=0, target=before)

        # the backup job sees the open gap, takes a base backup after it, and covers it
        job = BackupSchedule(_stream(rig, unique), rig.cfg.peers[0], rig.book(unique))
        await job.recover()
        assert job.newest is None or job.newest.start_lsn < gap.end
        assert await job.sync_once(asyncio.Event())
        [covered] = rig.book(unique).gaps()
        assert covered.covered_by == job.newest.id  # type: ignore[union-attr]
        await eventually(lambda: healthy(task), within=15)
        assert not await job.sync_once(asyncio.Event())  # covered: no second backup


def _stream(rig: Rig, name: str) -> StreamConfig:
    return StreamConfig(name=name, kind="postgres", postgres=rig.options)


async def _gap_records(rig: Rig, stream: str) -> list[tuple[int, int]]:
    """The gap records in the stream's log in b's vault, read and verified as a sink would."""
    out = []
    async for ref in Vault(rig.good).segments(stream):
        opened = await unseal(await rig.good.get(ref.key), rig.keys, expect_stream=stream)
        for _, start, data in decode_records(opened.header, opened.records):
            if start == GAP:
                out.append(unpack_gap(data))
    return out


async def test_a_restarted_stream_whose_vault_is_down_counts_from_its_checkpoint(
    rig: Rig, unique: str
) -> None:
    """After a restart or a role change the RPO must not start from zero while the vault
    does not answer: it counts from the last change the checkpoint says is durable."""
    from replicators import checkpoint

    task, _ = rig.task(unique, rig.closed_port)
    then = time.time() - 100.0
    state = {"stream": unique, "epoch": 1, "seq": 3, "end": 1 << 24, "source_time": then}
    checkpoint.save(rig.workdir / "shipped.json", {**state, "destination": "b"})
    async with running(task):
        await eventually(lambda: task.state == "retrying", within=10)
        assert gauge(task, rig.cfg.policy) >= 100.0
