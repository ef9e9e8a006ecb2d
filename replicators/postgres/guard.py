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

With several destinations (one guard per peer, one slot each) the guards share the
setting: each adds or removes only its own slot, under an advisory lock, and the list
is ``ANY n (slot, ...)`` with ``n`` the number of slots listed, i.e. a commit waits
until *every* listed destination's vault holds it. So whichever passive region takes
over (the most caught-up one, ``agent.coordination.successor``) holds every
acknowledged commit, provided its slot was listed (a guard that fell back, or has not
caught up yet, is not). A listed name that is no destination's slot (a peer no
longer configured, a slot of an earlier run) is dropped: it would block commits forever.

``StandbyMonitor`` (passive side): the standby's replay position against the
spool, for the replay-lag metrics.
"""

from __future__ import annotations

import asyncio
import re
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
    def __init__(
        self,
        options: PostgresOptions,
        stream: str,
        slot: str,
        siblings: frozenset[str] = frozenset(),
    ) -> None:
        self.options = options
        self.stream = stream
        self.slot = slot
        # the slots of the stream's other destinations: any other name listed is stale
        # (a peer no longer configured, an earlier run) and is dropped from the list
        self.siblings = siblings | {slot}
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
        # one guard at a time edits the list (several peers share it); released on close
        await conn.execute("SELECT pg_advisory_lock($1)", NAMES_LOCK)
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
        names = listed_slots(row["names"]) & self.siblings
        listed = self.slot in names
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
            self.synchronous = False  # from now on a commit may not wait for this vault
            await self._set_names(conn, standby_names(names - {self.slot}))
            self.log.error(
                "zero-loss mode suspended: falling back to asynchronous commits",
                stalled_seconds=round(now - self._last_progress, 1),
            )
        elif not listed and caught_up:
            await self._set_names(conn, standby_names(names | {self.slot}))
            self.synchronous = True
            self.log.info("zero-loss mode in force: commits wait for the vault")
        else:
            self.synchronous = listed

    async def _set_names(self, conn: asyncpg.Connection, value: str) -> None:
        quoted = value.replace("'", "''")
        await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{quoted}'")
        await conn.execute("SELECT pg_reload_conf()")
        # the next guard reads the list in a new session: wait until the server reloaded
        for _ in range(100):
            if await conn.fetchval(NAMES) == value:
                return
            await asyncio.sleep(0.01)


NAMES = "SELECT current_setting('synchronous_standby_names')"
NAMES_LOCK = 0x64726167656E74  # the advisory lock of the guards of one primary
_NAME = re.compile(r'"((?:[^"]|"")*)"|([A-Za-z_][A-Za-z0-9_$]*)')
_KEYWORDS = {"any", "first"}


def listed_slots(names: str) -> set[str]:
    """The standby names in a ``synchronous_standby_names`` value (quoted or not;
    ``ANY``/``FIRST`` and the count left out; ``*`` is not a slot)."""
    out = set()
    for quoted, bare in _NAME.findall(names):
        if quoted:
            out.add(quoted.replace('""', '"'))
        elif bare.lower() not in _KEYWORDS:
            out.add(bare.lower())
    return out


def standby_names(slots: set[str]) -> str:
    """The value that makes a commit wait for every one of ``slots`` ('' for none)."""
    if not slots:
        return ""
    quoted = ", ".join('"' + s.replace('"', '""') + '"' for s in sorted(slots))
    return quoted if len(slots) == 1 else f"ANY {len(slots)} ({quoted})"


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
