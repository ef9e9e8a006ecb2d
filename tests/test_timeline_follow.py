"""The WAL source follows a timeline switch: no gap, no new base backup needed.

A primary P (a cluster of its own, the lab's primary is not touched) has a physical
replica R. The source streams from P through a dsn on P's port; P stops, R is promoted
(timeline 2) and restarted on P's port. The source reconnects, finds R on a newer
timeline and streams the old timeline from its position up to the switch point, then
the new one: the log stays continuous, the history file is shipped, no gap is recorded,
and a restore from the base backup taken of P before the switch holds every row
committed on P and every row written on R. When R no longer has the WAL at the
position (recycled before the source reconnects), the source re-seeds with a gap as
before.
"""

# ruff: noqa: F811 - ``pg`` is test_postgres_lab's fixture, imported to be shared

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg2
import psycopg2.errors
import psycopg2.extras
import pytest

from agent.supervise import StreamTask, run_stream
from replicators.postgres import lsn as L
from replicators.postgres import pgtools
from replicators.postgres import timelines as T
from replicators.postgres.basebackup import take_backup
from replicators.postgres.gaps import GapBook
from replicators.postgres.options import PostgresOptions
from replicators.postgres.restore import RestoreTarget, restore
from replicators.postgres.spool import WalSpool, load_state
from replicators.postgres.walsource import WalSource
from replicators.progress import StreamProgress
from replicators.settings import Secret
from replicators.shipper import Shipper, ShipperSettings
from replicators.sink import Sink, SinkSettings
from tests.support import eventually
from tests.test_postgres_lab import (  # noqa: F401 - pg is a fixture
    PgRig,
    current_lsn,
    execute,
    fetchval,
    free_port,
    insert_range,
    pg,
)

_CONF = """
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
wal_keep_size = '64MB'
fsync = off
synchronous_commit = on
"""


@dataclass
class Pair:
    """A primary and its streaming replica, each started on a port given at start."""

    options: PostgresOptions
    primary: Path
    replica: Path
    port: int  # the primary's, later the promoted replica's: the source's dsn
    replica_port: int

    @property
    def dsn(self) -> str:
        return f"postgresql://dragent@127.0.0.1:{self.port}/app"

    async def start(self, data_dir: Path, port: int) -> None:
        log = str(data_dir / "postgres.log")
        await pgtools.run(
            self.options, "pg_ctl", "-D", str(data_dir), "-l", log, "-o", f"-p {port}",
            "-w", "-t", "60", "start",
        )  # fmt: skip

    async def stop(self, data_dir: Path) -> None:
        with contextlib.suppress(Exception):
            await pgtools.run(
                self.options, "pg_ctl", "-D", str(data_dir), "-m", "fast", "-w", "stop"
            )


@contextlib.asynccontextmanager
async def primary_and_replica(pg: PgRig) -> AsyncIterator[Pair]:
    options = pg.options.model_copy(update={"slot": "dragent_follow"})
    home = pg.workdir / "pair"
    pgtools.give_to_owner(options, home, 0o755)
    pair = Pair(options, home / "p", home / "r", free_port(), free_port())
    pgtools.give_to_owner(options, pair.primary)
    try:
        await pgtools.run(
            options, "initdb", "-D", str(pair.primary), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-locale", "--no-sync",
        )  # fmt: skip
        with (pair.primary / "postgresql.conf").open("a") as f:
            f.write(_CONF)
        await pair.start(pair.primary, pair.port)
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{pair.port}/postgres")
        try:
            await conn.execute("CREATE ROLE dragent LOGIN SUPERUSER REPLICATION")
            await conn.execute("CREATE DATABASE app OWNER dragent")
        finally:
            await conn.close()
        pgtools.give_to_owner(options, pair.replica)
        await pgtools.run(
            options, "pg_basebackup", "-d", f"postgresql://dragent@127.0.0.1:{pair.port}/app",
            "-D", str(pair.replica), "-R", "-X", "stream", "--no-sync",
        )  # fmt: skip
        await pair.start(pair.replica, pair.replica_port)
        yield pair
    finally:
        await pair.stop(pair.replica)
        await pair.stop(pair.primary)


class SlotBusyAtTheSwitch(WalSource):
    """A source whose next timeline finds its slot held for a second by another walsender
    (as the walsender of the timeline that ended may still hold it): a real replication
    connection takes the slot at the switch point just before the source asks for it."""

    held = False

    async def _next_leg(self) -> None:
        if not self.held:
            self.held = True
            holder = await asyncio.to_thread(_hold_slot, self.options, self._legs[1].start)
            asyncio.get_running_loop().call_later(1.0, holder.close)
        await super()._next_leg()


def _hold_slot(options: PostgresOptions, at: int) -> Any:
    """Blocking: a replication connection streaming ``options.slot`` from ``at`` (retried
    while the slot is still active for the walsender of the leg that ended)."""
    for _ in range(100):
        conn = psycopg2.connect(
            options.dsn.reveal(), connection_factory=psycopg2.extras.PhysicalReplicationConnection
        )
        try:
            conn.cursor().start_replication(slot_name=options.slot, start_lsn=at)
            return conn
        except psycopg2.errors.ObjectInUse:
            conn.close()
            time.sleep(0.02)
    raise AssertionError("the slot stayed busy")


def shipper_of(pg: PgRig, pair: Pair, book: GapBook, busy: bool = False) -> Shipper:
    name = pg.stream.name
    options = pair.options.model_copy(update={"dsn": Secret(pair.dsn, "test")})
    source = (SlotBusyAtTheSwitch if busy else WalSource)(options, "b", name, book)
    return Shipper(
        ShipperSettings(name, "b", 1, 8 << 20, 0.1),
        source,
        pg.vault,
        pg.send_keys,
        pg.workdir / "shipped.json",
        StreamProgress(name, "postgres", "source", "b"),
        pg.metrics.stream(name, "b"),
    )


@contextlib.asynccontextmanager
async def shipping(pg: PgRig, shipper: Shipper) -> AsyncIterator[StreamTask]:
    """The shipper under the agent's supervising loop (it reconnects after a SourceError)."""
    task = StreamTask("pg->b", shipper, shipper.progress, idle=0.1)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(run_stream(task, stop, pg.metrics))
        try:
            yield task
        finally:
            stop.set()
    await shipper.source.aclose()


async def replayed(dsn: str, table: str, rows: int) -> bool:
    with contextlib.suppress(asyncpg.PostgresError, OSError):
        return await fetchval(dsn, f"SELECT count(*) FROM {table}") == rows
    return False


async def fail_over(pair: Pair, table: str, rows: int) -> None:
    """R has every row committed on P; P stops; R is promoted and moves to P's port."""
    replica = f"postgresql://dragent@127.0.0.1:{pair.replica_port}/app"
    await eventually(lambda: replayed(replica, table, rows), within=30)
    await pair.stop(pair.primary)
    await pgtools.run(pair.options, "pg_ctl", "-D", str(pair.replica), "-w", "promote")
    await pair.stop(pair.replica)
    await pair.start(pair.replica, pair.port)


async def switch_point(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        tli = int(await conn.fetchval("SELECT timeline_id FROM pg_control_checkpoint()"))
        content = await conn.fetchval(
            "SELECT pg_read_file('pg_wal/' || $1)", L.history_file_name(max(tli, 2))
        )
    finally:
        await conn.close()
    [(old, at)] = T.parse_history(content)
    assert old == 1
    return at


def test_plan_and_labels() -> None:
    history = T.parse_history(b"1\t0/3000148\tno recovery target specified\n")
    assert history == [(1, 0x3000148)]
    legs, why = T.plan(0x3000000, 1, 2, history)
    assert why is None and legs == [T.Leg(1, 0x3000000, 0x3000148), T.Leg(2, 0x3000148, None)]
    assert T.file_to_read(legs) == "000000020000000000000003"  # the switch segment: new name
    assert T.plan(0x2000000, 0, 2, history)[0] == [
        T.Leg(1, 0x2000000, 0x3000148), T.Leg(2, 0x3000148, None)
    ]  # fmt: skip
    assert T.file_to_read(T.plan(0x2000000, 0, 2, history)[0] or []) == "000000010000000000000002"
    assert T.plan(0x3000148, 1, 2, history)[0] == [T.Leg(2, 0x3000148, None)]
    assert T.plan(0x3000200, 2, 2, history) == (None, None)  # on the current timeline
    assert "forked" in str(T.plan(0x3000200, 1, 2, history)[1])  # the old primary went on
    # the switch point's file keeps the old timeline's name; the next files the new one
    assert [T.label(x, 1, history, 2) for x in (0x3000100, 0x3000200, 0x4000000)] == [1, 1, 2]


@pytest.mark.lab
@pytest.mark.parametrize(
    ("spans_files", "busy"),
    [(False, False), (True, False), (True, True)],
    ids=["same-file", "next-file", "next-file-slot-busy"],
)
async def test_a_promoted_replica_is_followed_without_a_gap(
    pg: PgRig, spans_files: bool, busy: bool
) -> None:
    """``same-file``: the switch point lies in the WAL file of the shipped position (part
    of that file was shipped under timeline 1 before P stopped); ``next-file``: the old
    timeline's unshipped WAL spans a file boundary; ``slot-busy``: the slot is still held
    by another walsender for a second when the source asks for timeline 2 (it waits for
    it, and the WAL it streams keeps its timelines)."""
    table = "t_follow"
    book = GapBook(pg.workdir / "gaps", pg.stream.name, "b")
    async with primary_and_replica(pg) as pair:
        await execute(pair.dsn, f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        await take_backup(
            pair.options.model_copy(update={"dsn": Secret(pair.dsn, "test")}),
            pg.stream.name, pg.store, pg.send_keys,
        )  # fmt: skip
        shipper = shipper_of(pg, pair, book, busy)
        async with shipping(pg, shipper):
            await insert_range(pair.dsn, table, 0, 100)
            end = await current_lsn(pair.dsn)
            await eventually(lambda: shipper.end >= end, within=30)
        shipped = shipper.end
        # committed on P and received by R, never shipped: only R has it now
        await insert_range(pair.dsn, table, 100, 200)
        if spans_files:
            await execute(pair.dsn, "SELECT pg_switch_wal()")
        await insert_range(pair.dsn, table, 200, 300)
        await fail_over(pair, table, 300)
        switch = await switch_point(pair.dsn)
        assert shipped < switch
        assert (L.segment_start(shipped) < L.segment_start(switch)) is spans_files
        await insert_range(pair.dsn, table, 300, 400)  # on timeline 2
        await execute(pair.dsn, "SELECT pg_switch_wal()")
        await insert_range(pair.dsn, table, 400, 500)
        async with shipping(pg, shipper) as task:
            end = await current_lsn(pair.dsn)
            await eventually(lambda: shipper.end >= end, within=60)
            assert task.state != "halted"
            assert not busy or getattr(shipper.source, "held", False), "no switch was followed"
        assert book.gaps() == []
        # R holds the slot now, at the shipped position
        conn = await asyncpg.connect(pair.dsn)
        try:
            held = await conn.fetchval(
                "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                pair.options.slot,
            )
        finally:
            await conn.close()
        assert held is not None and L.parse_lsn(held) >= switch
    # the passive side: every segment continuous with the one before, no gap record
    spool_dir = pg.workdir / "follow-spool"
    sink = Sink(
        SinkSettings(pg.stream.name, "a"), pg.vault, pg.recv_keys, WalSpool(spool_dir),
        StreamProgress(pg.stream.name, "postgres", "sink", "vault"),
        pg.metrics.stream(pg.stream.name, "vault"),
    )  # fmt: skip
    await sink.recover()
    await sink.sync_once(asyncio.Event())
    state = load_state(spool_dir)
    assert state is not None and int(state["end"]) == shipper.end  # type: ignore[call-overload]
    assert "gap" not in state and state["timeline"] == 2
    history = (spool_dir / "00000002.history").read_bytes()
    assert T.parse_history(history) == [(1, switch)]
    names = {p.name for p in spool_dir.iterdir()}
    assert L.wal_file_name(1, shipped) in names
    assert L.wal_file_name(1, switch) in names  # the switch point's file: the old name
    assert L.wal_file_name(2, L.next_boundary(switch)) in names  # after it: timeline 2
    # a restore from the backup of P, to the latest point: every row of P and of R
    data_dir = pg.workdir / "restored"
    pg.clusters.append(data_dir)
    port = free_port()
    # PostgreSQL picks the newest timeline once, at its start: the restore fills the
    # spool (history files included) before it starts the cluster
    await restore(
        pg.options, pg.stream.name, pg.store, pg.recv_keys,
        target=RestoreTarget(), data_dir=data_dir, port=port,
    )  # fmt: skip
    restored = f"postgresql://dragent@127.0.0.1:{port}/app"
    assert await fetchval(restored, f"SELECT count(*) FROM {table}") == 500
    assert await fetchval(restored, f"SELECT count(DISTINCT id) FROM {table}") == 500
    assert await fetchval(restored, f"SELECT max(id) FROM {table}") == 499


@pytest.mark.lab
async def test_recycled_wal_on_the_promoted_replica_is_reseeded_with_a_gap(pg: PgRig) -> None:
    table = "t_follow"
    book = GapBook(pg.workdir / "gaps", pg.stream.name, "b")
    async with primary_and_replica(pg) as pair:
        await execute(pair.dsn, f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        shipper = shipper_of(pg, pair, book)
        async with shipping(pg, shipper):
            await insert_range(pair.dsn, table, 0, 100)
            end = await current_lsn(pair.dsn)
            await eventually(lambda: shipper.end >= end, within=30)
        shipped = shipper.end
        await insert_range(pair.dsn, table, 100, 200)
        await fail_over(pair, table, 200)
        # R recycles the files holding the shipped position before the source comes back
        conn = await asyncpg.connect(pair.dsn)
        try:
            await conn.execute("ALTER SYSTEM SET wal_keep_size = 0")
            await conn.execute("ALTER SYSTEM SET max_wal_size = '32MB'")
            await conn.execute("SELECT pg_reload_conf()")
            for _ in range(4):
                await conn.execute("SELECT pg_logical_emit_message(false, 'fill', 'x')")
                await conn.execute("SELECT pg_switch_wal()")
                await conn.execute("CHECKPOINT")
            names = [r["name"] for r in await conn.fetch("SELECT name FROM pg_ls_waldir()")]
        finally:
            await conn.close()
        segno = shipped // L.WAL_SEGMENT_SIZE
        wal = [L.parse_wal_file_name(n)[1] for n in names if len(n) == 24]
        assert wal and all(start // L.WAL_SEGMENT_SIZE > segno for start in wal), names
        # the agent restarted meanwhile: a new source, the timeline of its WAL not known
        options = pair.options.model_copy(update={"dsn": Secret(pair.dsn, "test")})
        source = WalSource(options, "b", pg.stream.name, book)
        source.note_durable_time(1234.5)
        await source.resume(shipped)
        try:
            [gap] = book.gaps()
            assert (gap.start, gap.start_time, gap.covered_by) == (shipped, 1234.5, None)
            assert "no longer holds WAL" in gap.reason and gap.end > shipped
            assert gap.end % L.WAL_SEGMENT_SIZE == 0
            batch = await source.next_batch(1 << 20, 0.1, asyncio.Event())
            assert (batch[0].start, batch[0].end) == (gap.start, gap.end)
            assert L.unpack_record(batch[0].payload)[1] == L.GAP
            assert L.unpack_record(batch[1].payload)[:2] == (2, L.HISTORY)
            # then the new timeline's WAL, from the new slot's start
            batch = await source.next_batch(1 << 20, 0.1, asyncio.Event())
            assert L.unpack_record(batch[0].payload)[:2] == (2, gap.end)
        finally:
            await source.aclose()
