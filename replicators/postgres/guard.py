"""Background jobs of the postgres kind besides backups.

``SyncGuard`` (active side, ``synchronous = true``): keeps the slot's
application_name in the primary's ``synchronous_standby_names`` so that a
commit is acknowledged only once its WAL is durable in the destination vault.
It lists the agent only once its walsender has caught up (so enabling it does
not stall commits behind a backlog). With ``synchronous_fallback_after`` > 0,
when the walsender is gone or its flush position has not moved for that long
while behind, it removes the agent from the list (commits go on,
asynchronously), logs an error and sets ``dragent_pg_synchronous`` to 0; it
lists the agent again once caught up. With 0 it never falls back: commits
block until the agent acknowledges (PostgreSQL's own behaviour). The guard
owns ``synchronous_standby_names`` (ALTER SYSTEM + reload); if the whole agent
is down nobody falls back, so commits block: run the agent supervised.

``StandbyMonitor`` (passive side): the standby's replay position against the
spool, for the replay-lag metrics.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from replicators import logs
from replicators.errors import SourceError
from replicators.postgres import lsn as L
from replicators.postgres import pgmetrics
from replicators.postgres.options import PostgresOptions
from replicators.postgres.spool import load_state
from replicators.postgres.standby import read_replay_position

_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


async def _connect(options: PostgresOptions) -> asyncpg.Connection:
    return await asyncpg.connect(options.dsn.reveal(), timeout=5)


class SyncGuard:
    def __init__(self, options: PostgresOptions, stream: str, slot: str) -> None:
        self.options = options
        self.stream = stream
        self.slot = slot
        self.synchronous = False
        self.log = logs.get("postgres.sync", stream=stream, slot=slot)
        self._last_flush: int | None = None
        self._last_progress = time.monotonic()
        self._previous_head: int | None = None
        pgmetrics.track_guard(self)

    async def recover(self) -> None:
        self._last_progress = time.monotonic()
        self._previous_head = None

    async def sync_once(self, stop: asyncio.Event) -> bool:
        """One check; returns False (the supervising loop waits ``every`` seconds)."""
        try:
            conn = await _connect(self.options)
        except _DB_ERRORS as exc:
            raise SourceError(f"primary unreachable: {exc}") from exc
        try:
            await self._check(conn)
        finally:
            await conn.close()
        return False

    async def _check(self, conn: asyncpg.Connection) -> None:
        row = await conn.fetchrow(
            "SELECT pg_current_wal_lsn()::text AS head,"
            " current_setting('synchronous_standby_names') AS names,"
            " (SELECT flush_lsn::text FROM pg_stat_replication WHERE application_name = $1"
            " ORDER BY flush_lsn DESC NULLS LAST LIMIT 1) AS flush",
            self.slot,
        )
        assert row is not None
        head = L.parse_lsn(row["head"])
        flush = L.parse_lsn(row["flush"]) if row["flush"] else None
        listed = self.slot in row["names"]
        now = time.monotonic()
        if flush is not None and flush != self._last_flush:
            self._last_flush, self._last_progress = flush, now
        caught_up = (
            flush is not None and self._previous_head is not None and flush >= self._previous_head
        )
        self._previous_head = head
        behind = flush is None or flush < head
        fallback = self.options.synchronous_fallback_after
        if listed and behind and fallback > 0 and now - self._last_progress > fallback:
            await self._set_names(conn, "")
            self.synchronous = False
            self.log.error(
                "zero-loss mode suspended: falling back to asynchronous commits",
                stalled_seconds=round(now - self._last_progress, 1),
            )
        elif not listed and caught_up:
            await self._set_names(conn, f'"{self.slot}"')
            self.synchronous = True
            self.log.info("zero-loss mode in force: commits wait for the vault")
        else:
            self.synchronous = listed

    async def _set_names(self, conn: asyncpg.Connection, value: str) -> None:
        quoted = value.replace("'", "''")
        await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{quoted}'")
        await conn.execute("SELECT pg_reload_conf()")


class StandbyMonitor:
    """Passive side: replay lag of the standby at ``options.dsn`` behind the spool."""

    def __init__(self, options: PostgresOptions, stream: str, spool: object) -> None:
        self.options = options
        self.stream = stream
        self.spool = spool
        self.replay_lag_bytes: int | None = None
        self.last_replay_time: float | None = None
        pgmetrics.track_monitor(self)

    async def recover(self) -> None:
        pass

    async def sync_once(self, stop: asyncio.Event) -> bool:
        try:
            conn = await _connect(self.options)
            try:
                lsn, replayed_at = await read_replay_position(conn)
            finally:
                await conn.close()
        except _DB_ERRORS:
            self.replay_lag_bytes = self.last_replay_time = None
            return False
        state = await asyncio.to_thread(load_state, self.spool)  # type: ignore[arg-type]
        if lsn and state:
            self.replay_lag_bytes = max(0, int(state["end"]) - L.parse_lsn(lsn))  # type: ignore[call-overload]
        self.last_replay_time = replayed_at
        return False
