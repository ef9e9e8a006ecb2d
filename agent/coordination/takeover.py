"""The takeover steps a region runs once it holds the new epoch.

In order, each timed: fence the old region if it still answers (best effort:
it fenced itself already if it is alive and cut off), catch up (the caller's
``catch_up`` — the daemon's final apply of the vault, ``agent.catchup`` —
then wait until the local standby has replayed the WAL so applied, or its
replay stops moving), make the standby read-only, promote (``pg_promote``),
unfence, switch DNS
and every other switch, then check the region serves (a heartbeat write under
the new epoch). The old region becomes a destination through the role change
the coordinator announces afterwards (the daemon rebuilds its streams).

The lease is re-checked right before promote and before unfence (``hold``):
a takeover that lost it stops there with ``LeaseLost``, the database still
read-only, so two regions never both take writes.

``promote`` and ``wait_replayed`` are idempotent: promoting a primary is a
no-op. Errors of a switch are recorded, not raised: the database is already
promoted, a human must finish the switch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from agent.coordination import events, fencing
from agent.switch.base import Switch, SwitchError
from replicators.errors import DragentError
from replicators.postgres.lsn import parse_lsn

REPLAY = """
SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, pg_last_wal_receive_lsn()::text"""


async def until(check: Callable[[], Awaitable[bool]], every: float = 0.05) -> None:
    """Return once ``check()`` is true, checking every ``every`` seconds (the
    caller bounds it with ``asyncio.timeout``)."""
    while True:
        if await check():
            return
        await asyncio.sleep(every)


class PromotionError(DragentError):
    """The standby could not be promoted."""


class CatchUpError(DragentError):
    """A standby did not replay up to an LSN in time."""


class LeaseLost(DragentError):
    """The takeover no longer holds the lease: the remaining steps must not run."""


RETRY_INTERVAL = "SELECT setting::int FROM pg_settings WHERE name = 'wal_retrieve_retry_interval'"
LSN_DONE = "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), $1::text::pg_lsn) >= 0"


async def current_lsn(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
    finally:
        await conn.close()


async def wait_lsn(dsn: str, lsn: str, within: float) -> None:
    """Wait until the standby at ``dsn`` has replayed ``lsn``. Raises CatchUpError."""
    conn = await asyncpg.connect(dsn)

    async def replayed() -> bool:
        return bool(await conn.fetchval(LSN_DONE, lsn))

    try:
        async with asyncio.timeout(within):
            await until(replayed)
    except TimeoutError:
        state = await conn.fetchrow(
            "SELECT pg_last_wal_replay_lsn()::text AS replayed, "
            "(SELECT status FROM pg_stat_wal_receiver) AS receiver"
        )
        raise CatchUpError(
            f"the standby did not replay {lsn} within {within:g}s "
            f"(replayed {state['replayed']}, wal receiver {state['receiver'] or 'not running'})"
        ) from None
    finally:
        await conn.close()


async def wait_replayed(
    dsn: str, within: float, settle: float = 0.3, target: str | None = None
) -> str | None:
    """Wait until the standby has replayed what it can; return the replay LSN (None on a
    primary). Done at once when replay reached ``target`` (the end of the WAL applied
    from the vault); otherwise once it replayed what it received and stood still for
    ``settle`` seconds — for a standby fed by restore_command (no WAL receiver) at least
    1.5 × its ``wal_retrieve_retry_interval``, the pause between two asks. Returns at the
    deadline with whatever was replayed."""
    conn = await asyncpg.connect(dsn)
    try:
        retry_ms = await conn.fetchval(RETRY_INTERVAL)
        last: str | None = None
        stable_since = time.monotonic()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            recovering, replayed, received = await conn.fetchrow(REPLAY)
            if not recovering:
                return None
            if target is not None and replayed and parse_lsn(replayed) >= parse_lsn(target):
                return str(replayed)
            if replayed != last:
                last, stable_since = replayed, time.monotonic()
            wait = settle if received is not None else max(settle, 1.5 * int(retry_ms) / 1000)
            caught = received is None or received == replayed
            if caught and time.monotonic() - stable_since >= wait:
                break
            await asyncio.sleep(0.05)
        return last
    finally:
        await conn.close()


async def promote(dsn: str, within: float = 60.0, unfence: bool = True) -> bool:
    """Promote the standby at ``dsn``; False if it already was a primary. With
    ``unfence`` it then accepts writes; without, it stays as fenced as it was (a
    takeover fences the standby first and unfences once it still holds the lease).
    Raises ``PromotionError``."""
    try:
        conn = await asyncpg.connect(dsn)
        try:
            if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                return False
            if not await conn.fetchval("SELECT pg_promote(true, $1)", int(within)):
                raise PromotionError(f"pg_promote did not finish within {within:g}s")
        finally:
            await conn.close()
        if unfence:
            await fencing.unfence(dsn)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise PromotionError(f"promotion failed: {exc}") from None
    return True


@dataclass
class Takeover:
    """One takeover's inputs and its timeline (wall clock)."""

    region: str
    old_region: str
    epoch: int
    reason: str
    dsn: str | None
    switches: Sequence[Switch]
    old_dsns: Sequence[str] = ()
    catch_up: Callable[[], Awaitable[str | None]] | None = None
    """Applies what is left in the vault; returns the LSN the standby must replay."""
    catchup_timeout: float = 30.0
    catchup_settle: float = 0.3
    hold: Callable[[str], Awaitable[None]] | None = None
    """Raises ``LeaseLost`` unless the lease is still held (called before promote and
    before unfence)."""
    timeline: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.timeline[name] = time.time()

    def record(self, kind: str, **extra: Any) -> dict[str, Any]:
        """The event of this takeover (``kind``: failover or switchover): its timeline and
        phases, the RTO from the failure first seen to the last step, and ``extra``."""
        t = self.timeline
        return {
            "kind": kind,
            "epoch": self.epoch,
            "from": self.old_region,
            "to": self.region,
            "region": self.region,
            "reason": self.reason,
            "timeline": t,
            "phases": events.phases(t),
            "rto_seconds": round(max(t.values()) - t["failure_seen"], 3),
            **extra,
            "notes": self.notes,
            "errors": self.errors,
        }

    async def run(self) -> None:
        """Every step after the epoch was acquired (see the module docstring)."""
        await self._fence_old()
        self.mark("fenced")
        target = None
        if self.catch_up is not None:
            try:
                async with asyncio.timeout(self.catchup_timeout):
                    target = await self.catch_up()
            except Exception as exc:  # recorded; promotion goes on with what was applied
                self.errors.append(f"catch-up: {type(exc).__name__}: {exc}")
            self.notes["vault_applied_lsn"] = target
        if self.dsn:
            self.notes["replayed_lsn"] = await wait_replayed(
                self.dsn, self.catchup_timeout, self.catchup_settle, target
            )
        self.mark("caught_up")
        if self.dsn:
            # read-only through the promotion: nothing writes before the lease is confirmed
            await fencing.fence_read_only(self.dsn)
        await self._hold("promote")
        if self.dsn:
            self.notes["promoted"] = await promote(self.dsn, unfence=False)
        await self._hold("unfence")
        if self.dsn:
            await fencing.unfence(self.dsn)
        self.mark("promoted")
        await self._switch()
        self.mark("dns_switched")

    async def _hold(self, step: str) -> None:
        if self.hold is not None:
            await self.hold(step)

    async def _fence_old(self) -> None:
        for dsn in self.old_dsns:
            try:
                async with asyncio.timeout(2.0):
                    self.notes["old_fenced"] = await fencing.fence_read_only(dsn)
            except (TimeoutError, fencing.FencingError, OSError) as exc:
                self.notes["old_fenced"] = f"unreachable ({type(exc).__name__})"

    async def _switch(self) -> None:
        for switch in self.switches:
            try:
                await switch.point_to(self.region, self.epoch)
            except SwitchError as exc:
                self.errors.append(f"{switch.describe()}: {exc}")
