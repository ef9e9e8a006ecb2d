"""A takeover interrupted by the death of its agent is finished by the next one.

Region b starts a takeover of region a (a's agent killed, a's database hung);
while b catches up, b's coordinator is killed too (its task cancelled, as a
kill -9 of the agent ends it), before it promoted anything. A new process of
region b finds the leader key naming b, taken by a takeover, and its database
still a standby: it finishes the takeover (lease checks, promotion, record)
instead of serving as "active" from a standby that takes no writes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from agent.lab import Lab
from agent.lab.failover_drill import Drill
from tests.support import eventually, takes_writes

pytestmark = pytest.mark.lab


async def test_a_takeover_cut_short_by_a_kill_is_finished_by_the_next_process(
    lab: Lab, unique: str, tmp_path: Path
) -> None:
    async with Drill(lab, unique, tmp_path) as drill:
        await drill.ready(30)
        b = drill.coordinators["b"]
        reached = asyncio.Event()

        async def stuck() -> str | None:
            reached.set()
            await asyncio.sleep(3600)
            return None

        b.catch_up = stuck
        await drill.kill("a")
        await lab.fault("a", "postgres", "pause")
        try:
            async with asyncio.timeout(30):
                await reached.wait()
            await drill.kill("b")  # mid-takeover: the lease is b's, nothing promoted
            conn = await asyncpg.connect(drill.b_dsn)
            try:
                assert await conn.fetchval("SELECT pg_is_in_recovery()")
            finally:
                await conn.close()
            again = drill.start("b")
            await eventually(lambda: again.last_record is not None, within=40)
        finally:
            await lab.fault("a", "postgres", "resume")
        record = again.last_record
        assert record is not None and record["epoch"] == 2 and not record.get("aborted")
        assert record["reason"].startswith("finishing the takeover")
        assert again.writable
        assert await takes_writes(drill.b_dsn)
