"""A takeover that loses the lease before its irreversible steps stops there.

Real etcd and PostgreSQL: region b starts a takeover of region a (a's agent
killed, a's database hung), and while b catches up its lease goes away: once
revoked and the next epoch taken by a third region (what etcd does when the
lease expires and another region wins), once because b's own etcd member is
suspended for longer than ``fence_after``. In both, b must never promote nor
unfence: its standby stays in recovery (or read-only), it holds no lease, its
role is passive, and the failover record says why it aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from agent.coordination.coordinator import Coordinator
from agent.coordination.lease import EtcdLease
from agent.lab import Lab
from agent.lab.failover_drill import Drill
from tests.support import eventually

pytestmark = pytest.mark.lab


async def _takeover_with(
    drill: Drill, lab: Lab, catch_up: Callable[[Coordinator], Awaitable[None]]
) -> Coordinator:
    await drill.ready(30)
    b = drill.coordinators["b"]

    async def hook() -> str | None:
        await catch_up(b)
        return None

    b.catch_up = hook
    await drill.kill("a")
    await lab.fault("a", "postgres", "pause")
    try:
        await eventually(lambda: b.last_record is not None, within=40)
    finally:
        await lab.fault("a", "postgres", "resume")
    return b


async def _never_writable(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        recovering = await conn.fetchval("SELECT pg_is_in_recovery()")
        if not recovering:
            assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("CREATE TABLE split_brain (id int)")
    finally:
        await conn.close()


async def test_lease_expired_and_taken_mid_catch_up_aborts_before_promote(
    lab: Lab, unique: str, tmp_path: Path
) -> None:
    async with Drill(lab, unique, tmp_path) as drill:
        thief = EtcdLease(drill.config("b").etcd, "c", 5.0)

        async def lose_the_lease(b: Coordinator) -> None:
            view = await thief.view()
            assert view.leader == "b"
            await thief._call("revoke_lease", view.leader_lease)  # what expiry does
            assert await thief.acquire(view.epoch) == view.epoch + 1

        try:
            b = await _takeover_with(drill, lab, lose_the_lease)
            record = b.last_record
            assert record is not None
            assert "etcd says the lease no longer exists" in record["aborted"]
            assert "promote" in record["aborted"]
            assert not b.holding and b.role == "passive" and b.fenced and not b.writable
            await _never_writable(drill.b_dsn)
            view = await thief.view()
            assert (view.leader, view.epoch) == ("c", record["epoch"] + 1)
        finally:
            await thief.release()
            await thief.aclose()


async def test_etcd_silent_past_fence_after_mid_catch_up_aborts(
    lab: Lab, unique: str, tmp_path: Path
) -> None:
    async with Drill(lab, unique, tmp_path) as drill:

        async def etcd_goes_quiet(b: Coordinator) -> None:
            await lab.fault("b", "etcd", "pause")
            await asyncio.sleep(b.f.fence_after + 0.5)

        try:
            b = await _takeover_with(drill, lab, etcd_goes_quiet)
        finally:
            await lab.fault("b", "etcd", "resume")
        record = b.last_record
        assert record is not None
        assert "no lease renewal for" in record["aborted"]
        assert not b.holding and b.fenced and not b.writable
        await _never_writable(drill.b_dsn)
