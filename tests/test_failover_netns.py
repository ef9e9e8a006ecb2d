"""Failover across real partitions: a lab in network namespaces, real agents in them.

The module starts a lab of its own with each member (a, b, witness) in its
own network namespace; each region's agent runs in its namespace with the
coordinator enabled (``agent.lab.agent_drill``), b's standby streams
from a across the a–b link, and links are cut with nftables drops inside the
namespaces (``Lab.partition``). Before each cut, etcd's leadership is moved to
b: the lease then expires one TTL after a's last renewal, on b's side of the
cut (the least time a has to fence itself), and in the a–b scenario a's own
member, cut off from its leader, answers nothing (a must renew through the
witness).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from agent.coordination import fencing
from agent.lab import MEMBERS, Lab
from agent.lab.agent_drill import AgentDrill, Watch
from agent.lab.bind import BindServer, resolve
from agent.lab.etcd import member_ids, move_leader
from agent.lab.failover_drill import Writer
from tests.support import eventually, fresh_dns, needs_netns, netns_lab

pytestmark = [pytest.mark.lab, needs_netns, pytest.mark.timeout(180)]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def netlab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    async with netns_lab(tmp_path_factory.mktemp("netlab") / "lab") as lab:
        yield lab


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def named(netlab: Lab) -> AsyncIterator[BindServer]:
    async with fresh_dns(netlab) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="session")
async def drill(
    netlab: Lab, named: BindServer, unique: str, tmp_path: Path
) -> AsyncIterator[AgentDrill]:
    from agent.failover_config import Rfc2136Switch
    from agent.switch.rfc2136 import Rfc2136

    switch = Rfc2136(Rfc2136Switch(**named.switch_config()))
    await switch.point_to("a")
    await switch.forget_epoch()  # each drill's etcd prefix starts its epochs over
    try:
        async with AgentDrill(netlab, unique, tmp_path, dns=named) as d:
            await d.ready(60)
            yield d
    finally:
        netlab.heal()


def _etcd(lab: Lab) -> dict[str, str]:
    return {m: lab.etcd_endpoint(m) for m in MEMBERS}


async def _write_while(writer: Writer, stop: asyncio.Event) -> None:
    await writer.setup()
    await writer.run(stop)


async def test_a_cut_off_from_b_and_the_witness_fences_itself_before_b_promotes(
    drill: AgentDrill, netlab: Lab, named: BindServer
) -> None:
    await move_leader(_etcd(netlab), "b")
    # a new etcd leader extends every lease by an election timeout (1 s); a's
    # renewals after that take the extension back
    await asyncio.sleep(1.5)
    writer = Writer(drill.a_dsn, "netcut_" + drill.name.replace("-", "_"))
    watch = Watch(drill)
    stop = asyncio.Event()
    record: dict[str, Any] = {}

    async def b_promoted() -> bool:
        b = await drill.status("b")
        if b and b["last_failover"] and "promoted" in b["last_failover"]["timeline"]:
            record.update(b["last_failover"])
            return True
        return False

    async with asyncio.TaskGroup() as tg:
        # given a client writing to a, which holds the lease
        tg.create_task(_write_while(writer, stop))
        tg.create_task(watch.run(stop))
        await eventually(lambda: len(writer.committed) > 5, within=10)
        # when a is cut off from b and from the witness, and stays alive
        cut_at = time.time()
        netlab.partition("a", "b")
        netlab.partition("a", "witness")
        try:
            await eventually(b_promoted, within=40)
            await asyncio.sleep(1.0)  # the client keeps trying against a
        finally:
            stop.set()
    # then a fenced itself before b took the lease and promoted
    fenced_at = drill.logged("a", "fenced")[0]
    timeline = record["timeline"]
    acquired_at, promoted_at = timeline["acquired"], timeline["promoted"]
    since = {"a fenced": fenced_at, "b acquired": acquired_at, "b promoted": promoted_at}
    print("after the cut:", {k: round(t - cut_at, 3) for k, t in since.items()}, record["phases"])
    assert cut_at < fenced_at < acquired_at < promoted_at
    assert record["epoch"] == 2 and record["from"] == "a" and record["to"] == "b"
    # and no write was accepted on a after its fence, nor after b's promotion
    assert writer.committed_after(fenced_at) == []
    assert writer.committed_after(promoted_at) == []
    assert any(t > promoted_at for t, _ in writer.refused)  # it did keep trying
    assert await resolve(named.port, address=named.address) == [named.addresses["b"]]
    # a was never writable again once fenced
    a_states = watch.states("a")
    assert a_states[0] == ("active", 1, False, True)
    assert all(fenced for _, _, fenced, _ in a_states[1:]), a_states

    # healed: a sees b's lease and stays fenced, as a follower
    netlab.heal()

    async def a_follows_b() -> bool:
        a = await drill.status("a")
        return bool(a and a["role"] == "passive" and a["leader"] == "b" and a["fenced"])

    await eventually(a_follows_b, within=20)
    assert await fencing.is_fenced(drill.a_dsn)


async def test_only_the_a_b_link_cut_no_failover_no_flapping(
    drill: AgentDrill, netlab: Lab
) -> None:
    await move_leader(_etcd(netlab), "b")
    writer = Writer(drill.a_dsn, "netab_" + drill.name.replace("-", "_"))
    watch = Watch(drill)
    stop = asyncio.Event()

    async def b_sees_a_down() -> bool:
        b = await drill.status("b")
        return bool(b and b["peers"]["a"]["down"])

    async with asyncio.TaskGroup() as tg:
        # given a client writing to a, which holds the lease
        tg.create_task(_write_while(writer, stop))
        tg.create_task(watch.run(stop))
        await eventually(lambda: len(writer.committed) > 5, within=10)
        # when only the a-b link is cut (both still reach the witness)
        netlab.partition("a", "b")
        try:
            await eventually(b_sees_a_down, within=10)
            await asyncio.sleep(3 * drill.lease_ttl)
        finally:
            stop.set()
            netlab.heal()
    _, leader = await member_ids(_etcd(netlab))
    decided = {r: sorted(watch.decisions(r)) for r in ("a", "b")}
    own_member_failed = len(drill.logged("a", "etcd unavailable"))
    print(f"etcd leader: {leader}; a's own member failed it {own_member_failed}x; {decided}")
    # then nobody failed over and nothing flapped
    assert watch.states("a") == [("active", 1, False, True)]
    assert len(watch.states("b")) == 1 and watch.states("b")[0][0] == "passive"
    assert not watch.states("b")[0][3]  # b never held the lease
    assert not writer.refused and len(writer.committed) > 50
    b = await drill.status("b")
    assert b is not None and b["last_failover"] is None and b["leader"] == "a"
