"""A WAL source started on a loaded host reads what the server sent with its answer.

``START_REPLICATION`` is a blocking libpq call: on a busy host the server's first WAL
messages often arrive with its answer and are read into libpq's buffer, so the socket is
not readable any more. A source that only waits for the socket then waits until the
primary writes again: after a switchover with no client writing, its stream stood still
(and its RPO grew) for minutes. Each round here writes, then resumes the source from its
last position with the primary quiet, on a host kept busy by three spinning processes
(about half of such starts leave WAL in libpq's buffer here), and the source must read
up to the primary's flushed end.
"""

# ruff: noqa: F811 - ``pg`` is test_postgres_lab's fixture, imported to be shared

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

import pytest

from replicators.postgres import lsn as L
from replicators.postgres.walsource import WalSource
from tests.test_postgres_lab import (  # noqa: F401 - pg is a fixture
    PgRig,
    execute,
    fetchval,
    insert_range,
    pg,
    table_of,
)

ROUNDS = 12


@contextlib.asynccontextmanager
async def busy_host(spinners: int = 3) -> AsyncIterator[None]:
    spin = "import time\nend = time.monotonic() + 120\nwhile time.monotonic() < end: pass"
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", spin) for _ in range(spinners)
    ]
    try:
        yield
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()


async def flushed(dsn: str) -> int:
    return L.parse_lsn(str(await fetchval(dsn, "SELECT pg_current_wal_flush_lsn()::text")))


async def read_to(source: WalSource, end: int, within: float) -> int:
    """Batches until one reaches ``end``; the end reached (``within`` seconds at most)."""
    reached = 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    timer = loop.call_later(within, stop.set)
    try:
        while reached < end and not stop.is_set():
            batch = await source.next_batch(16 << 20, 0.05, stop)
            reached = max([reached, *(c.end for c in batch)])
    finally:
        timer.cancel()
    return reached


@pytest.mark.lab
async def test_a_resumed_source_reads_the_wal_that_came_with_the_servers_answer(
    pg: PgRig,
) -> None:
    dsn = pg.options.dsn.reveal()
    table = table_of(pg)
    await execute(dsn, f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    source = WalSource(pg.options, "b")
    try:
        await source.resume(0)
        position = await read_to(source, await flushed(dsn), within=10)
        async with busy_host():
            for i in range(ROUNDS):
                await source.aclose()
                await insert_range(dsn, table, i * 20, (i + 1) * 20)
                end = await flushed(dsn)
                await source.resume(position)  # the primary is quiet from here on
                reached = await read_to(source, end, within=5)
                assert reached >= end, (
                    f"round {i}: the source stood at {L.format_lsn(reached)}, "
                    f"the primary had flushed {L.format_lsn(end)}"
                )
                position = reached
    finally:
        await source.aclose()
