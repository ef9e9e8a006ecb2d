"""Fencing this region's PostgreSQL, so that a region that may have lost the
lease takes no more writes.

``read-only``: ``ALTER SYSTEM SET default_transaction_read_only = on``,
``pg_reload_conf()``, then terminate every other client session so no open
transaction keeps writing (new sessions start read-only; the setting survives
a restart, so a fenced region comes back fenced). A client that deliberately
runs ``SET default_transaction_read_only = off`` could still write: for
untrusted clients use ``stop``, which runs the configured ``stop_command``
(e.g. ``pg_ctl stop -m immediate`` or ``systemctl stop postgresql``).

All functions are idempotent and raise ``FencingError`` when they cannot
confirm the result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import asyncpg
import psycopg2.extensions

from replicators.errors import DragentError

TERMINATE = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
"""


RELOAD_WITHIN = 10.0
"""How long a fence waits for the postmaster to apply read-only to new sessions."""


class FencingError(DragentError):
    """The database could not be fenced (or unfenced) for certain."""


async def _connect(dsn: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise FencingError(f"cannot connect to {_host(dsn)}: {exc}") from None


def _host(dsn: str) -> str:
    """Where ``dsn`` points, for messages: host, port and database, never a password
    (URL or key=value form alike)."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "a database (unparsable DSN)"
    host, port = params.get("host", "localhost"), params.get("port", "5432")
    return f"{host}:{port}/{params.get('dbname', '')}"


async def fence_read_only(dsn: str) -> int:
    """Make the cluster read-only and end every other session; return how many.
    A standby (in recovery) takes no writes yet, but gets the setting too, so that
    it comes out of a promotion read-only (returns 0: no session ended)."""
    conn = await _connect(dsn)
    try:
        standby = await conn.fetchval("SELECT pg_is_in_recovery()")
        await conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        await conn.execute("SELECT pg_reload_conf()")
        # pg_reload_conf only signals: wait until the postmaster re-read the file,
        # so sessions opened after this returns are read-only. A deadline, not a count
        # of tries: on a loaded host each new session alone can take most of a second.
        deadline = time.monotonic() + RELOAD_WITHIN
        while True:
            fresh = await asyncpg.connect(dsn)
            try:
                if await fresh.fetchval("SHOW default_transaction_read_only") == "on":
                    break
            finally:
                await fresh.close()
            if time.monotonic() > deadline:
                raise FencingError(
                    f"{_host(dsn)} did not reload default_transaction_read_only "
                    f"within {RELOAD_WITHIN:.0f} s"
                )
            await asyncio.sleep(0.02)
        if standby:
            return 0
        return int(await conn.fetchval(TERMINATE))
    except asyncpg.PostgresError as exc:
        raise FencingError(f"fencing {_host(dsn)} failed: {exc}") from None
    finally:
        await conn.close()


async def unfence(dsn: str) -> None:
    """Undo ``fence_read_only`` (only ever called by the lease holder; a standby's
    setting is reset too, it takes no writes until promoted anyway)."""
    conn = await _connect(dsn)
    try:
        await conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
        await conn.execute("SELECT pg_reload_conf()")
    except asyncpg.PostgresError as exc:
        raise FencingError(f"unfencing {_host(dsn)} failed: {exc}") from None
    finally:
        await conn.close()


async def is_fenced(dsn: str) -> bool:
    """True if a new session on the cluster starts read-only."""
    return (await fence_state(dsn))[0]


async def fence_state(dsn: str) -> tuple[bool, bool]:
    """(a new session starts read-only, the cluster is in recovery: a standby)."""
    conn = await _connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT current_setting('default_transaction_read_only') = 'on', pg_is_in_recovery()"
        )
        assert row is not None
        return bool(row[0]), bool(row[1])
    finally:
        await conn.close()


async def stop(argv: Sequence[str]) -> None:
    """Run the stop command; raise ``FencingError`` if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode:
        tail = out.decode(errors="replace")[-500:]
        raise FencingError(f"stop command {argv[0]} exited {proc.returncode}: {tail}")


async def fence(dsn: str | None, mode: str, stop_command: Sequence[str]) -> str:
    """Fence by ``mode`` (read-only|stop); return a one-line account."""
    if mode == "stop":
        await stop(stop_command)
        return "postgresql stopped"
    if dsn is None:
        return "nothing to fence (no postgres_dsn)"
    ended = await fence_read_only(dsn)
    return f"postgresql read-only, {ended} sessions ended"
