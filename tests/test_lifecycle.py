"""The DR lifecycle, round after round, with both agents as processes.

Region a's agent ships its primary's WAL into b's vault; b's standby replays it
through the vault (``dragent standby init``). Each round: a planned switchover
a→b while a client writes, ``dragent failback`` of a, a switchover b→a, and
``dragent failback`` of b. Then region a is killed (agent kill -9, PostgreSQL
stopped immediately) while the client writes, b takes over on its own, a is
failed back and traffic moves back with a switchover.

After every step, from the client's log of acknowledged commits: no
acknowledged row lost in a switchover, and losses within the RPO target in
the unplanned failover (the stream is asynchronous). After every role change,
the stream in the new direction flows (the new primary's agent reports an RPO
under a second within two minutes, then keeps it there) and a restore drill
from the new passive region's vault passes (its base backup was taken by the
new active side on its own; after a failback the slot is new, so the stream
goes on after a recorded gap).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from agent.lab import Lab
from agent.lab.bind import ADDRESSES, BindServer, resolve
from agent.lab.failover_drill import Writer, present_ids
from agent.lab.vault_standby import VaultStandbyRig
from tests.support import eventually
from tests.test_failover_pgstandby import WORK_ROOT, resolve_to, rig_for

pytestmark = pytest.mark.lab

ROUNDS = 3
RPO_TARGET = 1.0
SETTLE = 120.0  # the stream in the new direction must be under target within this
WATCH = 5.0  # then stay under it for this long, sampled


@pytest_asyncio.fixture(loop_scope="session")
async def rig(lab: Lab, unique: str, named: BindServer) -> AsyncIterator[VaultStandbyRig]:
    r = rig_for(lab, unique, named)
    try:
        yield r
    finally:
        await r.cleanup(keep_logs=WORK_ROOT)  # region a left a writable primary


class Life:
    """The rig, one writer per primary, and the checks run after each step."""

    def __init__(self, rig: VaultStandbyRig) -> None:
        self.rig = rig
        self.table = "life_" + rig.name.replace("-", "_")[-40:]
        self.dsn = {"a": rig.primary, "b": rig.replica}
        self.writers: list[Writer] = []
        self.steps: list[dict[str, object]] = []

    async def write_while(
        self, region: str, step: Callable[[], Awaitable[object]] | None = None
    ) -> Writer:
        """A client writes to ``region`` for a moment (while ``step()`` runs, if given: it
        starts once the client has committed some rows)."""
        writer = Writer(self.dsn[region], self.table, first_id=1 + 1_000_000 * len(self.writers))
        self.writers.append(writer)
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(writer.run(stop))
            await eventually(lambda: len(writer.committed) > 20, within=20)
            if step is not None:
                await step()
            await asyncio.sleep(0.3)
            stop.set()
        return writer

    async def lost(self, region: str) -> list[float]:
        """Commit times of acknowledged rows missing from ``region``'s primary."""
        present = await present_ids(self.dsn[region], self.table)
        return [t for w in self.writers for i, t in w.committed if i not in present]

    async def switchover(self, to: str) -> dict[str, object]:
        old = "a" if to == "b" else "b"
        out = await self.rig.cli(
            "switchover", "--to", to, "--config", str(self.rig.config[to]),
            "--old-dsn", self.dsn[old],
        )  # fmt: skip
        assert "switchover" in out.lower(), out
        agent = self.rig.agents[to]

        async def serving() -> bool:
            status = await agent.status()
            return bool(status and status["role"] == "active" and not status["failover"]["fenced"])

        await eventually(serving, within=30)
        return {"step": f"switchover to {to}", "out": out.strip().splitlines()[-1]}

    async def failback(self, region: str) -> str:
        out = await self.rig.cli("failback", "--config", str(self.rig.config[region]))
        assert f"{region}: re-seeded as a standby of the leader" in out, out
        return out.strip().splitlines()[-1]

    async def flows(self, active: str) -> dict[str, float]:
        """The stream from ``active`` into the other region's vault is under the RPO target
        within ``SETTLE`` seconds, and stays there for ``WATCH`` seconds with a client
        writing; returns the samples' p50 and p99."""
        agent = self.rig.agents[active]

        async def rpo() -> float | None:
            status = await agent.status()
            if not status or status.get("role") != "active":
                return None
            shipping = [s for s in status["streams"] if s.get("side") == "source"]
            if not shipping or any(s.get("rpo_seconds") is None for s in shipping):
                return None
            return max(float(s["rpo_seconds"]) for s in shipping)

        async def under() -> bool:
            value = await rpo()
            return value is not None and value < RPO_TARGET

        began = time.monotonic()
        try:
            await eventually(under, within=SETTLE)
        except BaseException:
            status = await agent.status() or {}
            print("streams of", active, json.dumps(status.get("streams"), indent=1))
            print(agent.tail(60))
            raise
        settled = time.monotonic() - began
        samples: list[float] = []

        async def sample() -> None:
            end = time.monotonic() + WATCH
            while time.monotonic() < end:
                value = await rpo()
                assert value is not None, await agent.status()
                samples.append(value)
                await asyncio.sleep(0.1)

        await self.write_while(active, sample)
        samples.sort()
        p50, p99 = (
            samples[len(samples) // 2],
            samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        )
        assert p99 < RPO_TARGET, samples
        return {"settled_seconds": round(settled, 1), "p50": p50, "p99": p99, "n": len(samples)}

    async def drill(self, passive: str) -> dict[str, object]:
        """A restore drill from ``passive``'s vault passes (run once the client stopped and
        the passive region has applied everything)."""
        code, out = await self.rig.cli_status(
            "drill", "restore", "--config", str(self.rig.config[passive]), "--format", "json"
        )
        report = json.loads(out[out.index("{") :])
        assert code == 0 and report["ok"], report
        return {"rto": report["rto_seconds"]}


async def test_three_rounds_then_an_unplanned_failover_lose_nothing_acknowledged(
    rig: VaultStandbyRig,
) -> None:
    life = Life(rig)
    a, b = rig.agents["a"], rig.agents["b"]
    await Writer(rig.primary, life.table).setup()
    await rig.start()
    await resolve_to(rig, "a")
    await life.flows("a")

    for round_ in range(1, ROUNDS + 1):
        for old, new in (("a", "b"), ("b", "a")):
            await life.write_while(old, functools.partial(life.switchover, new))
            assert await life.lost(new) == [], f"round {round_}: switchover to {new} lost rows"
            assert await resolve(rig.dns.port) == [ADDRESSES[new]]
            how = await life.failback(old)
            flow = await life.flows(new)
            drill = await life.drill(old)
            life.steps.append({"round": round_, "to": new, "failback": how, **flow, **drill})

    # region a dies whole while the client writes to it; b takes over on its own
    writer = Writer(rig.primary, life.table, first_id=1 + 1_000_000 * len(life.writers))
    life.writers.append(writer)
    await rig.kill_region_a(writer)

    async def b_serves() -> bool:
        status = await b.status()
        return bool(status and status["role"] == "active" and not status["failover"]["fenced"])

    await eventually(b_serves, within=60)
    record = (await b.status())["failover"]["last_failover"]  # type: ignore[index]
    assert record["kind"] == "failover" and not record["errors"], record
    lost = await life.lost("b")
    present = await present_ids(rig.replica, life.table)
    kept = max(t for w in life.writers for i, t in w.committed if i in present)
    assert not lost or max(lost) - kept <= RPO_TARGET, (len(lost), max(lost) - kept)
    # a comes back as b's standby, b's stream flows, then traffic moves back
    await rig.lab.fault("a", "all", "start")
    await a.start()
    await life.failback("a")
    await life.flows("b")
    await life.drill("a")
    await life.write_while("b", lambda: life.switchover("a"))
    assert set(await life.lost("a")) <= set(lost)
    print(json.dumps(life.steps, indent=1))
