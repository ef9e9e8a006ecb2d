"""Whether a PostgreSQL cluster can serve: primary, or a standby and how it is fed."""

from __future__ import annotations

import asyncio

import asyncpg


async def database_role(dsn: str) -> tuple[bool, str]:
    """(reachable, what it is: ``primary`` or ``standby, wal receiver ...``); never raises."""
    try:
        async with asyncio.timeout(2.0):
            conn = await asyncpg.connect(dsn)
            try:
                recovering = await conn.fetchval("SELECT pg_is_in_recovery()")
                receiver = await conn.fetchval("SELECT status FROM pg_stat_wal_receiver")
            finally:
                await conn.close()
    except Exception as exc:  # reported, never raised
        return False, f"{type(exc).__name__}: {exc}"
    if not recovering:
        return True, "primary"
    return True, f"standby, wal receiver {receiver or 'not running (restore_command)'}"
