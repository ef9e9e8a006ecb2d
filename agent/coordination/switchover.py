"""Planned switchover and operator-driven failover.

``switchover``: pause automation, fence the old primary, wait until the new
region's standby has replayed everything the old one wrote, hand the lease
over in one etcd transaction (the leader key names the new region under a
fresh lease and epoch), promote, switch traffic, resume automation. Nothing
is lost: the old primary accepted no write after its fence and the standby
replayed up to the old primary's last LSN before promotion. The new region's
coordinator adopts the lease; the old one sees it lost the lease and stays
fenced.

``failover``: the same without the old region's help. Without ``force`` it
refuses while the old leader's lease is alive (the automation would then do
it; this is for when it is paused, off or locked out). With ``force`` it also
takes the lease from a live holder, which then fences itself as soon as it
reads the new leader key: use it only when the old region cannot serve.

Both write a record (kind ``switchover``/``failover``) like the automatic path.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any

from agent.config import AgentConfig
from agent.coordination import events, fencing
from agent.coordination.coordinator import Coordinator
from agent.coordination.lease import EtcdLease, EtcdUnavailable
from agent.coordination.takeover import CatchUpError, Takeover, current_lsn, wait_lsn
from replicators.errors import DragentError


class SwitchoverError(DragentError):
    """The switchover or manual failover was refused or could not finish."""


async def hand_over(lease: EtcdLease, to: str, *, force: bool) -> int:
    """Move the leader key to ``to`` under a new lease and epoch, in one transaction
    that checks nobody changed leader or epoch since they were read. Returns the
    new epoch; the caller's process holds the new lease until ``to``'s
    coordinator adopts it."""
    client = lease._clients[lease._current]
    t = client.transactions
    leader_key, epoch_key = lease.key("leader"), lease.key("epoch")
    leader = await lease._call("get", leader_key)
    epoch_kv = await lease._call("get", epoch_key)
    if leader is not None and not force:
        raise SwitchoverError(
            "the leader lease is held", hint="use switchover, or --force if the leader is sick"
        )
    epoch = int(json.loads(epoch_kv.value)["epoch"]) if epoch_kv else 0
    new_lease = await lease._call("lease", lease.ttl)
    compare = [
        t.mod(leader_key) == leader.mod_revision if leader else t.version(leader_key) == 0,
        t.mod(epoch_key) == epoch_kv.mod_revision if epoch_kv else t.version(epoch_key) == 0,
    ]
    body = json.dumps({"region": to, "epoch": epoch + 1, "via": "switchover"}).encode()
    success = [
        t.put(leader_key, body, lease=new_lease.id),
        t.put(epoch_key, json.dumps({"epoch": epoch + 1, "region": to}).encode()),
    ]
    won, _ = await lease._call("transaction", compare=compare, success=success, failure=[])
    if not won:
        raise SwitchoverError("the leader or epoch changed meanwhile: nothing was done")
    return epoch + 1


async def run(
    target: AgentConfig,
    *,
    old_dsn: str | None,
    planned: bool,
    force: bool = False,
    within: float = 60.0,
) -> dict[str, Any]:
    """Switch over (``planned``) or fail over to ``target``'s region; return the record.

    Run it with the target region's configuration (its ``postgres_dsn`` is the
    standby to promote, its switches move traffic). Raises SwitchoverError."""
    coordinator = Coordinator(target)
    lease = coordinator.lease
    try:
        view = await lease.view()
        if view.leader == target.region:
            raise SwitchoverError(f"{target.region} already holds the lease")
        old = view.leader or view.last_leader or "?"
        await lease.set_paused(True, "switchover" if planned else "manual failover")
        try:
            return await _run(coordinator, old, old_dsn, planned, force or planned, within)
        finally:
            with contextlib.suppress(Exception):
                await lease.set_paused(False)
    finally:
        await coordinator.aclose()


async def _run(
    c: Coordinator, old: str, old_dsn: str | None, planned: bool, force: bool, within: float
) -> dict[str, Any]:
    dsn = c.f.dsn
    run = Takeover(
        region=c.region,
        old_region=old,
        epoch=0,
        reason="planned switchover" if planned else "operator failover",
        dsn=dsn,
        switches=c.switches,
        old_dsns=[old_dsn] if old_dsn and not planned else [],
        catchup_timeout=within,
    )
    run.mark("failure_seen")
    if planned:
        if not old_dsn or not dsn:
            raise SwitchoverError("a switchover needs the old primary's DSN and postgres_dsn")
        await fencing.fence_read_only(old_dsn)
        lsn = await current_lsn(old_dsn)
        run.notes["old_last_lsn"] = lsn
        run.mark("fenced")
        try:
            await wait_lsn(dsn, lsn, within)
        except CatchUpError as exc:
            outcome = await put_back(c, old, old_dsn)
            record = run.record("switchover", refused=str(exc), outcome=outcome)
            events.write_local(c.cfg.data_dir, record)
            await events.to_evidence(c.cfg, record)
            await events.notify(c.f.notify, record)
            raise SwitchoverError(f"{exc}; {outcome}") from None
    run.epoch = await hand_over(c.lease, c.region, force=force)
    run.mark("acquired")
    if planned:
        run.old_dsns = []
    await run.run()
    if c.heartbeat is not None:
        c.last_heartbeat = await c.heartbeat.beat(run.epoch)
    run.mark("serving")
    kind = "switchover" if planned else "failover"
    record = run.record(kind, rpo_seconds=0.0 if planned else None)
    await c.publish(record)
    return record


async def put_back(c: Coordinator, old: str, old_dsn: str) -> str:
    """After a refused switchover: unfence the old primary if its region still holds
    the lease (nothing was handed over), else leave it fenced. Returns what was done,
    as read back from the database."""
    try:
        view = await c.lease.view()
    except EtcdUnavailable:
        return f"{old}'s primary stays fenced: etcd did not say who holds the lease"
    if view.leader != old:
        return f"{old}'s primary stays fenced: the lease is held by {view.leader or 'nobody'}"
    try:
        await fencing.unfence(old_dsn)
        fenced = await fencing.is_fenced(old_dsn)
    except fencing.FencingError as exc:
        return f"{old}'s primary could not be unfenced ({exc}): its agent retries"
    if fenced:
        return f"{old}'s primary still reads default_transaction_read_only = on"
    return f"{old}'s primary unfenced: it holds the lease and takes writes again"


def describe(record: dict[str, Any]) -> Sequence[str]:
    """Lines for the CLI."""
    lines = [events.summary(record)]
    lines += [f"  {phase:<10} {secs:>8.3f}s" for phase, secs in record["phases"].items()]
    lines += [f"  error: {e}" for e in record["errors"]]
    return lines
