"""Failover onto the PostgreSQL kind's own warm standby, fed through the vault.

Both agents run as processes with a ``postgres`` stream and ``[failover]
enabled``: a ships its WAL into b's vault, b's sink rebuilds the WAL spool,
and the standby built by ``dragent standby init`` replays it through
``dragent wal-fetch``. Region a is killed whole (agent, PostgreSQL, S3, etcd
member) while a client writes to it; b's coordinator (inside its daemon)
takes the lease, waits for replay to settle, promotes the standby and moves
the DNS record. Ground truth: the client's log of acknowledged commits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from agent.lab import Lab
from agent.lab.bind import ADDRESSES, BindServer, resolve
from agent.lab.failover_drill import Writer, present_ids
from agent.lab.vault_standby import VaultStandbyRig
from replicators.postgres.lsn import parse_lsn
from tests.support import eventually

pytestmark = pytest.mark.lab

WORK_ROOT = Path("/tmp/dragent-failover-tests")  # reachable by the postgres OS user


def rig_for(lab: Lab, unique: str, dns: BindServer) -> VaultStandbyRig:
    slot = "dragent_f" + unique.replace("-", "_")[-40:]
    return VaultStandbyRig(lab, unique, dns, WORK_ROOT / unique, slot)


@pytest_asyncio.fixture(loop_scope="session")
async def rig(lab: Lab, unique: str, named: BindServer) -> AsyncIterator[VaultStandbyRig]:
    r = rig_for(lab, unique, named)
    try:
        yield r
    finally:
        await r.cleanup(keep_logs=WORK_ROOT)


async def test_region_a_killed_b_promotes_the_vault_fed_standby(rig: VaultStandbyRig) -> None:
    table = "f_" + rig.name.replace("-", "_")
    writer = Writer(rig.primary, table)
    await writer.setup()
    a, b = rig.agents["a"], rig.agents["b"]
    await rig.start()
    await resolve_to(rig, "a")

    async def b_follows_with_known_lag() -> bool:
        status = await b.status()
        failover = (status or {}).get("failover") or {}
        return (
            failover.get("lag_seconds") is not None
            and (await a.status() or {}).get("role") == "active"
        )

    await eventually(b_follows_with_known_lag, within=60)
    await rig.kill_region_a(writer)

    async def b_serves() -> bool:
        status = await b.status()
        return bool(
            status
            and status["role"] == "active"
            and status["epoch"] == 2
            and status["failover"]["last_failover"]
        )

    await eventually(b_serves, within=60)
    record = (await b.status())["failover"]["last_failover"]  # type: ignore[index]
    assert not record["errors"], record
    assert record["notes"]["promoted"] is True
    # the last apply of the vault named an LSN, and the standby replayed up to it
    applied, replayed = record["notes"]["vault_applied_lsn"], record["notes"]["replayed_lsn"]
    assert applied and replayed and parse_lsn(replayed) >= parse_lsn(applied), record
    assert await resolve(rig.dns.port) == [ADDRESSES["b"]]
    present = await present_ids(rig.replica, table)
    kept = [t for i, t in writer.committed if i in present]
    lost = [t for i, t in writer.committed if i not in present]
    rpo = max(lost) - max(kept) if lost else 0.0
    assert rpo <= 1.0, (len(lost), record)
    assert record["rpo_seconds"] is not None and record["rpo_seconds"] <= 1.0
    assert record["rto_seconds"] < 60


async def resolve_to(rig: VaultStandbyRig, region: str) -> None:
    from agent.failover_config import Rfc2136Switch
    from agent.switch.rfc2136 import Rfc2136

    switch = Rfc2136(Rfc2136Switch(**rig.dns.switch_config()))
    await switch.point_to(region)
    await switch.forget_epoch()  # this rig's etcd prefix starts its epochs over
