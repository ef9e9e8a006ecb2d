"""The WAL source: a physical replication slot per destination, streamed from the primary.

- ``resume(position)`` creates the slot ``dragent_<peer>`` if missing and starts
  streaming at ``position`` (or, for a new stream, at the start of the WAL file
  holding the slot's ``restart_lsn``). psycopg2's ``PhysicalReplicationConnection``
  does the protocol; its socket is watched with ``loop.add_reader``, so nothing
  blocks the event loop once streaming.
- The flush position reported to the primary moves only in ``ack()``, i.e. once
  the WAL is durable in the destination vault: the slot keeps everything that
  is not yet safe, and a synchronous primary waits for exactly that.
- Changes are WAL byte runs ``[start LSN, end LSN)``; a batch never crosses a
  WAL file boundary, so a vault segment maps onto one WAL file.
- On a timeline after 1 (a promoted standby), the timeline's history file is
  sent first, as a record of its own, so standbys and restores can follow it.
- Source times come from (insert LSN, wall time) samples taken on the primary
  every ``sample_interval``; every ``heartbeat_interval`` a heartbeat message is
  written into the WAL so an idle primary still produces WAL. The newest sample is
  also the stream's ``head()``: once the durable position reaches a sample's LSN,
  everything the primary had written at its time is durable, which proves the
  RPO of an idle primary between heartbeats (``replicators.progress``). Samples
  are taken only while the source streams: a failing source proves nothing.

After a promotion (the dsn now reaches a standby of the old primary, promoted to a
newer timeline), a position on the old timeline at or before the switch point is
followed without a gap while the server still has its WAL file in ``pg_wal``: the
new history file first, the slot created (and held at the position by the first
feedback), then ``START_REPLICATION ... TIMELINE <old>`` up to the switch point and
``TIMELINE <new>`` from there, on a new connection (psycopg2 cannot answer the
server's end-of-timeline CopyDone, so the connection is not reused). The legs and
the timeline each byte is recorded under: ``replicators.postgres.timelines``.

A slot that no longer holds the WAL at the durable position (invalidated, or
created anew after a failback lost it) is re-seeded, never retried forever:
the stream goes on from the slot's start after a gap record, and the gap is
recorded (``replicators.postgres.gaps``) for the backup job, the RPO and the
evidence log.

Errors: ``SourceError`` (connection lost); the supervising loop calls
``recover()`` again, which reconnects from the last durable position.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from typing import Any, ClassVar

import asyncpg
import psycopg2
import psycopg2.errors
import psycopg2.extras

from replicators import logs
from replicators.errors import SourceError
from replicators.postgres import lsn as L
from replicators.postgres import pgmetrics
from replicators.postgres import timelines as T
from replicators.postgres.gaps import Gap, GapBook
from replicators.postgres.lsn import LsnClock
from replicators.postgres.options import PostgresOptions
from replicators.stream import Change

KIND = "postgres"
HEARTBEAT_PREFIX = "dragent-heartbeat"
_SLOT_CHECK_EVERY = 5.0
_STOP_POLL = 0.1  # how soon a set stop event is noticed while idle
SLOT_RELEASE_WAIT = 5.0
"""How long a new leg waits for the walsender of the leg that ended to release the slot."""


def slot_name(options: PostgresOptions, peer: str) -> str:
    return options.slot or "dragent_" + "".join(c if c.isalnum() else "_" for c in peer.lower())


class WalSource:
    KIND: ClassVar[str] = KIND

    def __init__(
        self,
        options: PostgresOptions,
        peer: str,
        stream: str = "",
        gaps: GapBook | None = None,
    ) -> None:
        self.options = options
        self.stream = stream
        self.peer = peer
        self.gaps = gaps
        self.slot = slot_name(options, peer)
        self.log = logs.get("postgres.source", slot=self.slot)
        self.clock = LsnClock()
        self.timeline = 0
        self.retained_bytes = 0
        self.flush_lag: float | None = None
        self.write_lag: float | None = None
        self._conn: Any = None
        self._fd = -1
        self._history: bytes | None = None
        self._gap: Change | None = None
        self._durable_time: float | None = None
        self._cursor: Any = None
        self._db: asyncpg.Connection | None = None
        self._buf: deque[tuple[int, bytes, float, int]] = deque()  # start, data, seen, timeline
        self._legs: list[T.Leg] = []  # while following a timeline switch: this leg, the next
        self._until: int | None = None  # where the server ends this leg's timeline
        self._labels: tuple[int, list[tuple[int, int]], int] | None = None  # T.label's args
        self._received = 0
        self._acked = 0
        self._failed: BaseException | None = None
        self._data = asyncio.Event()
        self._next_sample = 0.0
        self._next_heartbeat = 0.0
        self._next_slot_check = 0.0
        self._slot_created = False  # by the last ``resume``
        pgmetrics.track_source(self)

    # -- lifecycle --------------------------------------------------------------------------

    async def resume(self, position: int) -> None:
        """(Re)connect and stream from ``position`` (0: a new stream, from the slot)."""
        shipped = self.timeline  # the timeline of the WAL shipped so far (0: not known)
        await self.aclose()
        self._failed = None
        self._buf.clear()
        self._gap = None
        self._legs, self._until = [], None
        try:
            self._db = await asyncpg.connect(self.options.dsn.reveal(), timeout=10)
            if await self._db.fetchval("SELECT pg_is_in_recovery()"):
                # a slot made now would hold the standby's timeline, which its promotion ends
                raise SourceError(
                    "the database is a standby (in recovery): WAL is shipped from a primary"
                )
            self._slot_created = False
            restart, why = await self._ensure_slot()
            followed = position > 0 and await self._follow(position, shipped)
            start = position if position else L.segment_start(restart)
            if followed:
                why = None
            elif (
                position
                and why is None
                and not shipped
                and await self._hold_slot_at(position, restart)
            ):
                pass  # a slot created after the position the destination's vault ends at
            elif position and position < L.segment_start(restart):
                why = why or (
                    f"slot {self.slot} no longer holds WAL at {L.format_lsn(position)} "
                    f"(restart_lsn {L.format_lsn(restart)})"
                )
                start = L.segment_start(restart)
            else:
                why = None  # a new stream, or a slot re-created before anything was shipped
            if self._conn is None:
                await asyncio.to_thread(self._start_replication, start)
        except SourceError:
            await self.aclose()
            raise
        except (OSError, asyncpg.PostgresError, psycopg2.Error) as exc:
            await self.aclose()
            raise SourceError(f"cannot stream from the primary: {exc}") from exc
        if why is not None:
            self._reseed(position, start, why)
        self._received = self._acked = start
        self._watch_socket()
        await self._sample(heartbeat=True)
        self.log.info("streaming", start=L.format_lsn(start), timeline=self.timeline)

    async def _follow(self, position: int, shipped: int) -> bool:
        """Stream ``position`` (shipped on timeline ``shipped``, 0: not known) through the
        timeline switches of the server's history, if the server is on a newer timeline
        and still has the WAL file at ``position``. False: not needed, or not possible
        (the caller then streams the current timeline as before, re-seeding if need be)."""
        assert self._db is not None
        current, content = await asyncio.to_thread(self._identify)
        self._labels = self._labels if self._labels and self._labels[2] == current else None
        if current < 2 or content is None:
            return False
        history = T.parse_history(content)
        legs, why = T.plan(position, shipped, current, history)
        if legs is None:
            if why is not None:
                self.log.error("cannot follow the timeline switch", reason=why)
            return False
        name = T.file_to_read(legs)
        if not await self._in_pg_wal(name):
            self.log.error(
                "cannot follow the timeline switch: WAL file no longer on the server",
                file=name, position=L.format_lsn(position),
            )  # fmt: skip
            return False
        # the switch point's WAL file keeps the name of the timeline shipped before it
        self._labels = (shipped or T.timeline_of(position, history, current), history, current)
        self._legs = legs
        await asyncio.to_thread(self._start_replication, position, legs[0])
        # the first feedback set the slot's restart_lsn to the position: from then on the
        # server keeps that WAL; the file must still be there now that it is held
        await self._wait_slot_holds(position)
        if not await self._in_pg_wal(name):
            raise SourceError(f"WAL file {name} was removed while the slot was being set up")
        self.log.info(
            "following a timeline switch",
            legs=[(leg.timeline, L.format_lsn(leg.start)) for leg in legs],
        )
        return True

    async def _hold_slot_at(self, position: int, restart: int) -> bool:
        """A slot newer than ``position`` (made just now: a primary promoted in another
        region ships to a destination whose vault another primary filled up to
        ``position``, on this server's current timeline): stream from ``position`` if the
        server still has its WAL file; the first feedback sets the slot's restart_lsn
        back to it. False (nothing started) if not possible. Only for a source that has
        shipped nothing yet (a new shipper after a takeover): a slot this source lost is
        re-seeded with a recorded gap (``_reseed``), as before."""
        if not self._slot_created or position >= L.segment_start(restart) or self._conn:
            return False
        current, content = await asyncio.to_thread(self._identify)
        if content is not None and current >= 2:
            history = T.parse_history(content)
            if T.timeline_of(position, history, current) != current:
                return False  # on an older timeline: ``_follow``'s case
        name = L.wal_file_name(current, position)
        if not await self._in_pg_wal(name):
            return False
        await asyncio.to_thread(self._start_replication, position)
        await self._wait_slot_holds(position)
        if not await self._in_pg_wal(name):
            raise SourceError(f"WAL file {name} was removed while the slot was being set up")
        self.log.info("slot held back to the destination's end", position=L.format_lsn(position))
        return True

    async def _in_pg_wal(self, name: str) -> bool:
        assert self._db is not None
        try:
            found = await self._db.fetchval(
                "SELECT count(*) FROM pg_ls_waldir() WHERE name = $1", name
            )
        except asyncpg.InsufficientPrivilegeError:
            self.log.warning("pg_ls_waldir() not permitted: a timeline switch is not followed")
            return False
        return bool(found)

    async def _wait_slot_holds(self, position: int, within: float = 5.0) -> None:
        """Until the slot's restart_lsn is at or before ``position`` (our first feedback
        reached the walsender), at most ``within`` seconds."""
        assert self._db is not None
        deadline = time.monotonic() + within
        query = "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1"
        while time.monotonic() < deadline:
            held = await self._db.fetchval(query, self.slot)
            if held is not None and L.parse_lsn(held) <= position:
                return
            await asyncio.sleep(0.05)

    async def _next_leg(self) -> None:
        """The server ended this leg's timeline at its switch point: stream the next
        timeline from there, on a new connection."""
        ended = self._legs.pop(0)
        leg = self._legs[0]
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            loop.remove_reader(self._fd)
        with contextlib.suppress(Exception):
            self._conn.close()
        self._conn = self._cursor = None
        deadline = time.monotonic() + SLOT_RELEASE_WAIT
        while True:
            try:
                await asyncio.to_thread(self._start_replication, self._received, leg, history=False)
                break
            except psycopg2.Error as exc:
                # the walsender of the leg that ended may not have released the slot yet
                busy = isinstance(exc, psycopg2.errors.ObjectInUse)
                if not busy or time.monotonic() > deadline:
                    raise SourceError(f"cannot stream timeline {leg.timeline}: {exc}") from exc
                await asyncio.sleep(0.05)
        self._watch_socket()
        self.log.info(
            "timeline switch followed",
            ended=ended.timeline, at=L.format_lsn(self._received), timeline=leg.timeline,
        )  # fmt: skip

    def _watch_socket(self) -> None:
        """Read the replication socket whenever it is readable, and read now what libpq
        already holds: the blocking START_REPLICATION may have received the first WAL
        messages with its answer, and those are in libpq's buffer, not the socket's; on an
        idle primary nothing more comes to wake the reader (the stream would wait, its RPO
        growing, until the next write)."""
        self._fd = self._conn.fileno()
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)
        self._on_readable()

    def note_durable_time(self, source_time: float | None) -> None:
        """Before ``resume``: the source time of the last change durable at the position
        given, which dates the start of a gap should the slot no longer hold it."""
        self._durable_time = source_time

    async def _ensure_slot(self) -> tuple[int, str | None]:
        """The slot's restart LSN, creating the slot if missing; an invalidated slot is
        dropped and created again. Returns why the slot was (re)created after an
        invalidation (None otherwise)."""
        assert self._db is not None
        row = await self._db.fetchrow(
            "SELECT restart_lsn::text, wal_status FROM pg_replication_slots WHERE slot_name = $1",
            self.slot,
        )
        if row is None:
            self.log.info("creating replication slot")
            self._slot_created = True
            await self._db.execute(
                "SELECT pg_create_physical_replication_slot($1, true)", self.slot
            )
            return await self._ensure_slot()
        if row["wal_status"] == "lost" or row["restart_lsn"] is None:
            self.log.error("replication slot invalidated: creating it again")
            await self._db.execute("SELECT pg_drop_replication_slot($1)", self.slot)
            restart, _ = await self._ensure_slot()
            return restart, f"slot {self.slot} was invalidated (max_slot_wal_keep_size)"
        return L.parse_lsn(row["restart_lsn"]), None

    def _reseed(self, position: int, start: int, why: str) -> None:
        """The slot cannot serve ``position``: stream from ``start`` and say so in the log
        (a gap record first), in the gap book and in the agent's log."""
        now = time.time()
        # dated by the last durable change: a restore to a time after it meets the gap
        at = self._durable_time if self._durable_time is not None else now
        self._gap = Change(L.pack_gap(self.timeline, position, start), position, start, at)
        gap = Gap(
            stream=self.stream, peer=self.peer, slot=self.slot, start=position, end=start,
            timeline=self.timeline, start_time=self._durable_time, found_at=now, reason=why,
        )  # fmt: skip
        if self.gaps is not None:
            self.gaps.add(gap)
        self.log.error(
            "WAL gap: the slot re-seeded; a new base backup is needed",
            **{k: v for k, v in gap.describe().items() if k in ("start", "end", "reason")},
        )

    def unrestorable_since(self) -> float | None:
        """Source time from which the destination vault cannot restore (a gap no base
        backup covers yet), or None (``replicators.progress``)."""
        return self.gaps.unrestorable_since() if self.gaps is not None else None

    def _replication_connection(self) -> Any:
        return psycopg2.connect(
            self.options.dsn.reveal(),
            connection_factory=psycopg2.extras.PhysicalReplicationConnection,
            application_name=self.slot,
            connect_timeout=10,
        )

    def _identify(self) -> tuple[int, bytes | None]:
        """Blocking: the server's timeline and its history file (None on timeline 1)."""
        conn = self._replication_connection()
        try:
            cur = conn.cursor()
            return self._identify_on(cur)
        finally:
            conn.close()

    @staticmethod
    def _identify_on(cur: Any) -> tuple[int, bytes | None]:
        cur.execute("IDENTIFY_SYSTEM")
        timeline = int(cur.fetchone()[1])
        if timeline < 2:
            return timeline, None
        cur.execute(f"TIMELINE_HISTORY {timeline}")
        content = cur.fetchone()[1]
        return timeline, content.encode() if isinstance(content, str) else bytes(content)

    def _start_replication(
        self, start: int, leg: T.Leg | None = None, *, history: bool = True
    ) -> None:
        """Blocking: connect, identify the timeline, START_REPLICATION, first feedback.
        ``leg``: a timeline to stream (following a switch), not the server's current;
        ``history``: send the server's history file first (not again at a leg's change)."""
        conn = self._replication_connection()
        try:
            cur = conn.cursor()
            current, content = self._identify_on(cur)
            if leg is None:
                streamed, timeline = current, 0
            else:
                if self._labels is None or current != self._labels[2]:
                    raise SourceError(f"the server moved to timeline {current} meanwhile")
                streamed = timeline = leg.timeline
            cur.start_replication(
                slot_name=self.slot, start_lsn=start, timeline=timeline, status_interval=1
            )
            # A synchronous primary counts us only after one feedback with a flush position.
            flush = start if leg is None else min(start, self._acked or start)
            cur.send_feedback(write_lsn=start, flush_lsn=flush, force=True)
        except BaseException:
            conn.close()
            raise
        # only now: a start that failed leaves the timeline of what was shipped so far
        self.timeline = streamed
        if history:
            self._history = None if content is None else L.pack_history(current, content)
        self._conn, self._cursor = conn, cur
        self._until = None if leg is None else leg.until

    async def aclose(self) -> None:
        self._until = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = self._cursor = None
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.close(timeout=2)
            self._db = None

    # -- receiving --------------------------------------------------------------------------

    def _on_readable(self) -> None:
        """Drain every message the socket holds; record a failure instead of raising."""
        try:
            while (msg := self._cursor.read_message()) is not None:
                start = int(msg.data_start)
                payload = bytes(msg.payload)
                if start != self._received:
                    raise SourceError(
                        f"WAL stream jumped from {L.format_lsn(self._received)} "
                        f"to {L.format_lsn(start)}"
                    )
                now = time.time()
                for piece_start, piece in L.split_at_boundaries(start, payload):
                    self._buf.append((piece_start, piece, now, self._label(piece_start)))
                self._received = start + len(payload)
                self._data.set()
                if self._leg_ended():
                    # the server ends the copy here (CopyDone): next_batch starts the next leg
                    asyncio.get_running_loop().remove_reader(self._fd)
                    return
        except Exception as exc:
            self._failed = exc
            self._data.set()
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)

    def _label(self, start: int) -> int:
        """The timeline a WAL byte at ``start`` is recorded under (``timelines.label``)."""
        if self._labels is None:
            return self.timeline
        return T.label(start, *self._labels)

    def _leg_ended(self) -> bool:
        return self._until is not None and self._received >= self._until

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise SourceError(f"replication stream lost: {self._failed}") from self._failed
        if self._conn is None:
            raise SourceError("not streaming (resume() was not called or failed)")

    # -- batches ----------------------------------------------------------------------------

    async def next_batch(self, max_bytes: int, max_age: float, stop: asyncio.Event) -> list[Change]:
        """WAL byte runs within one WAL file, up to ``max_bytes`` or ``max_age`` old."""
        batch: list[Change] = []
        size = 0
        first_seen: float | None = None
        if self._gap is not None:
            # A gap record first: the log goes on after WAL it never received.
            batch.append(self._gap)
            self._gap = None
        if self._history is not None:
            # A new timeline's history file travels first, so a standby can follow it.
            at = self._buf[0][0] if self._buf else self._received
            batch.append(Change(self._history, at, at, time.time()))
            self._history = None
        while True:
            self._check_failed()
            if self._leg_ended() and len(self._legs) > 1:
                await self._next_leg()
            await self._housekeeping()
            while self._buf and size < max_bytes:
                start, data, seen, timeline = self._buf[0]
                if batch and L.segment_start(start) != L.segment_start(batch[0].start):
                    return batch
                self._buf.popleft()
                batch.append(self._change(start, data, seen, timeline))
                size += len(data)
                first_seen = first_seen if first_seen is not None else seen
                if (start + len(data)) % L.WAL_SEGMENT_SIZE == 0:
                    return batch
            now = time.time()
            if size >= max_bytes or stop.is_set():
                return batch
            if batch and self.options.synchronous:
                return batch  # commits are waiting for this ack: ship as soon as we are idle
            if first_seen is not None and now >= first_seen + max_age:
                return batch
            wake = min(self._next_sample, self._next_heartbeat)
            if first_seen is not None:
                wake = min(wake, first_seen + max_age)
            self._data.clear()
            if self._buf or self._failed:
                continue
            await _wait(self._data, min(wake - now, _STOP_POLL))

    def _change(self, start: int, data: bytes, seen: float, timeline: int) -> Change:
        t = self.clock.time_at(start)
        source_time = seen if t is None else min(t, seen)
        return Change(L.pack_record(timeline, start, data), start, start + len(data), source_time)

    def pending_since(self) -> float | None:
        """Source time of the oldest WAL received but not yet batched."""
        if not self._buf:
            return None
        start, _, seen, _ = self._buf[0]
        t = self.clock.time_at(start)
        return seen if t is None else min(t, seen)

    def head(self) -> tuple[int, float] | None:
        """(insert LSN, time) of the newest sample: at that time every WAL byte the primary
        had written lay before that LSN (``replicators.progress.Head``)."""
        return self.clock.latest()

    def lag_bytes(self) -> dict[str, int]:
        """The primary's newest sampled insert LSN minus the received and acked positions."""
        head = self.clock.newest()
        if head is None:
            return {}
        return {"captured": max(0, head - self._received), "durable": max(0, head - self._acked)}

    async def ack(self, position: int) -> None:
        """Report ``position`` flushed: the primary may now recycle WAL before it."""
        if position <= self._acked or self._cursor is None:
            return
        self._acked = position
        self.clock.forget_before(position)
        try:
            self._cursor.send_feedback(write_lsn=self._received, flush_lsn=position, force=True)
        except psycopg2.Error as exc:
            self._failed = exc

    # -- primary-side queries ---------------------------------------------------------------

    async def _housekeeping(self) -> None:
        now = time.time()
        if now >= self._next_sample:
            await self._sample(heartbeat=now >= self._next_heartbeat)
        if now >= self._next_slot_check:
            self._next_slot_check = now + _SLOT_CHECK_EVERY
            await self._check_slot()

    async def _sample(self, heartbeat: bool) -> None:
        """One (insert LSN, time) sample; with ``heartbeat`` also a WAL heartbeat message."""
        assert self._db is not None
        at = time.time()
        try:
            if heartbeat:
                body = json.dumps({"time": at, "slot": self.slot})
                row = await self._db.fetchrow(
                    "SELECT pg_current_wal_insert_lsn()::text AS lsn, "
                    "pg_logical_emit_message(false, $1, $2)",
                    HEARTBEAT_PREFIX,
                    body,
                )
                self._next_heartbeat = at + self.options.heartbeat_interval
            else:
                row = await self._db.fetchrow("SELECT pg_current_wal_insert_lsn()::text AS lsn")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise SourceError(f"primary unreachable: {exc}") from exc
        assert row is not None
        self.clock.add(L.parse_lsn(row["lsn"]), at)
        self._next_sample = at + self.options.sample_interval

    async def _check_slot(self) -> None:
        """Retained WAL of our slot and PostgreSQL's own lag figures for our walsender."""
        assert self._db is not None
        row = await self._db.fetchrow(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint AS retained, "
            "s.wal_status, extract(epoch FROM r.flush_lag)::float8 AS flush_lag, "
            "extract(epoch FROM r.write_lag)::float8 AS write_lag "
            "FROM pg_replication_slots s LEFT JOIN pg_stat_replication r "
            "ON r.pid = s.active_pid WHERE s.slot_name = $1",
            self.slot,
        )
        if row is None:
            raise SourceError(f"replication slot {self.slot} disappeared")
        self.retained_bytes = int(row["retained"] or 0)
        self.flush_lag = row["flush_lag"]
        self.write_lag = row["write_lag"]
        if self.retained_bytes > int(self.options.slot_warn_bytes):
            self.log.warning(
                "slot retains too much WAL",
                retained_bytes=self.retained_bytes,
                warn_bytes=int(self.options.slot_warn_bytes),
                wal_status=row["wal_status"],
            )


async def _wait(event: asyncio.Event, delay: float) -> None:
    if delay <= 0:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay):
            await event.wait()
