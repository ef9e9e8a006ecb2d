"""The nemesis's faults on a ``netns`` lab: inject one, heal it.

Each fault is a pair of coroutines over a ``Stage`` (the lab, the drill, the
run's random generator): ``inject`` returns a one-line detail for the
history, ``heal`` undoes it and is idempotent. Targets name what is hit:

- ``kill``: ``agent-a``, ``agent-b``, ``primary``, ``standby`` (whichever
  database has that role now), ``s3-a``, ``s3-b``, ``etcd-a``, ``etcd-b``,
  ``etcd-witness``: SIGKILL of the process tree; healed by starting it again;
- ``pause-holder``: the agent that holds the lease, SIGSTOPped for the lease
  TTL plus 2 s whatever the planned duration, then SIGCONT (the long pause);
- ``partition``: ``a-b``, ``a-witness``, ``b-witness``, both ways;
- ``partition-one-way``: ``a>b``, ``b>a``, ``a>witness``...: one direction;
- ``slow-link``: ``a`` or ``b``: ``tc tbf`` at 256 kbit/s on the member's link,
  both directions (its namespace end and its host end);
- ``etcd-quorum``: ``a`` or ``b``: that region's etcd member and the witness's
  suspended, so no side has a quorum;
- ``flip-byte``: ``vault-b``: one byte of the newest segment of the drill's
  stream in region b's vault flipped (recorded in ``Stage.corrupted``);
- ``isolate``: ``a`` or ``b``: the region cut from the other region and from the
  witness (the host, and so the clients, still reach it: a client with a stale
  DNS cache keeps writing to it);
- ``kill-region``: ``a`` or ``b``: the region's agent, database and etcd member
  killed at once (a region lost), started again at heal.

- ``clock-skew``: ``a`` or ``b``: the region's agent restarted under
  libfaketime (``faketime -f +Ns``) with its wall clock 5 to 30 s ahead or
  behind (monotonic time offset alike, so durations stay true); healed by a
  restart on the true clock.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.config import parse_config
from agent.lab import Lab, LabError
from agent.lab.agent_drill import AgentDrill, agent_status
from agent.lab.network import ip_program
from replicators.s3 import S3Store
from replicators.vault import Vault

TARGETS: dict[str, list[str]] = {
    "kill": [
        "agent-a", "agent-b", "primary", "standby", "s3-a", "s3-b",
        "etcd-a", "etcd-b", "etcd-witness",
    ],
    "pause-holder": ["holder"],
    "partition": ["a-b", "a-witness", "b-witness"],
    "partition-one-way": ["a>b", "b>a", "a>witness", "b>witness"],
    "slow-link": ["a", "b"],
    "etcd-quorum": ["a", "b"],
    "flip-byte": ["vault-b"],
    "isolate": ["a", "b"],
    "kill-region": ["a", "b"],
    "clock-skew": ["a", "b"],
}  # fmt: skip


@dataclass
class Stage:
    """What the faults act on, and what they leave for the checker."""

    lab: Lab
    drill: AgentDrill
    rng: random.Random
    corrupted: list[str] = field(default_factory=list)
    paused_agent: str | None = None

    async def primary(self) -> str:
        """The region whose database takes writes now (by its agent's view), else a."""
        for region in ("a", "b"):
            status = await self.drill.status(region)
            if status and status["role"] == "active" and not status["fenced"]:
                return region
        return "a"


Step = Callable[[Stage, str], Awaitable[str]]


async def _database(stage: Stage, which: str) -> str:
    primary = await stage.primary()
    return primary if which == "primary" else ("b" if primary == "a" else "a")


async def kill(stage: Stage, target: str) -> str:
    lab = stage.lab
    if target in ("primary", "standby"):
        region = await _database(stage, target)
        await _kill_database(stage, region)
        return f"{target} database (region {region}) killed"
    kind, region = target.split("-", 1)
    service = {"agent": "agent", "s3": "s3", "etcd": "etcd"}[kind]
    await lab.fault(region, service, "kill")  # type: ignore[arg-type]
    return f"{service} of {region} killed"


async def unkill(stage: Stage, target: str) -> str:
    lab = stage.lab
    if target in ("primary", "standby"):
        if stage.drill.standby is not None and not stage.drill.standby.is_running():
            await stage.drill.standby.start()
        await lab.fault("a", "postgres", "start")
        return "databases started"
    kind, region = target.split("-", 1)
    if kind == "agent":
        await lab.start_agent(region)
    else:
        await lab.fault(region, {"s3": "s3", "etcd": "etcd"}[kind], "start")  # type: ignore[arg-type]
    return f"{kind} of {region} started"


async def pause_holder(stage: Stage, target: str) -> str:
    for region in ("a", "b"):
        status = await agent_status(stage.lab.agent_url(region))
        if status and status.get("failover") and status["failover"]["holding_lease"]:
            stage.paused_agent = region
            await stage.lab.fault(region, "agent", "pause")
            return f"agent of {region} (the lease holder) suspended"
    return "no agent held the lease: nothing suspended"


async def unpause(stage: Stage, target: str) -> str:
    region, stage.paused_agent = stage.paused_agent, None
    if region is not None:
        await stage.lab.fault(region, "agent", "resume")
    return f"agent of {region} resumed" if region else "nothing to resume"


async def partition(stage: Stage, target: str) -> str:
    x, y = target.split("-")
    stage.lab.partition(x, y)
    return f"{x} and {y} cut from each other"


async def partition_one_way(stage: Stage, target: str) -> str:
    x, y = target.split(">")
    stage.lab.partition_one_way(x, y)
    return f"{x}'s packets to {y} dropped"


async def heal_links(stage: Stage, target: str) -> str:
    stage.lab.heal()
    return "every link restored"


def _tc(namespace: str | None, *args: str) -> None:
    prefix = [ip_program(), "netns", "exec", namespace] if namespace else []
    subprocess.run([*prefix, "tc", *args], capture_output=True, timeout=10, check=False)


def _links(stage: Stage, region: str) -> list[tuple[str | None, str]]:
    net = stage.lab.network
    return [(net.namespace(region), "eth0"), (None, net.host_link(region))]


async def slow_link(stage: Stage, target: str) -> str:
    for ns, dev in _links(stage, target):
        _tc(ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", "256kbit",
            "burst", "16kbit", "latency", "400ms")  # fmt: skip
    return f"{target}'s link slowed to 256 kbit/s both ways"


async def fast_link(stage: Stage, target: str) -> str:
    for ns, dev in _links(stage, target):
        _tc(ns, "qdisc", "del", "dev", dev, "root")
    return f"{target}'s link at full speed"


async def etcd_quorum(stage: Stage, target: str) -> str:
    for member in (target, "witness"):
        await stage.lab.fault(member, "etcd", "pause")
    return f"etcd members of {target} and the witness suspended: no quorum"


async def etcd_back(stage: Stage, target: str) -> str:
    for member in (target, "witness"):
        await stage.lab.fault(member, "etcd", "resume")
    return "etcd members resumed"


async def flip_byte(stage: Stage, target: str) -> str:
    cfg = parse_config(stage.lab.agent_config("b"), "lab b")
    store = await S3Store.open(cfg.vault)
    try:
        refs = [r async for r in Vault(store).segments(stage.drill.name[:63])]
        if not refs:
            return "no segment yet: nothing flipped"
        ref = refs[-1]
        blob = bytearray(await store.get(ref.key))
        blob[stage.rng.randrange(len(blob))] ^= 0x01 << stage.rng.randrange(8)
        await store.put(ref.key, bytes(blob))
    finally:
        await store.aclose()
    stage.corrupted.append(ref.key)
    return f"one bit flipped in {ref.key}"


async def isolate(stage: Stage, target: str) -> str:
    other = "b" if target == "a" else "a"
    stage.lab.partition(target, other)
    stage.lab.partition(target, "witness")
    return f"{target} cut from {other} and from the witness"


async def kill_region(stage: Stage, target: str) -> str:
    await stage.lab.fault(target, "agent", "kill")
    await _kill_database(stage, target)
    await stage.lab.fault(target, "etcd", "kill")
    return f"agent, database and etcd member of {target} killed"


async def _kill_database(stage: Stage, region: str) -> None:
    if region == "b" and stage.drill.standby is not None:
        await stage.drill.standby.kill()
    else:
        await stage.lab.fault(region, "postgres", "kill")


async def revive_region(stage: Stage, target: str) -> str:
    await stage.lab.fault(target, "etcd", "start")
    if target == "b" and stage.drill.standby is not None:
        await stage.drill.standby.start()
    else:
        await stage.lab.fault(target, "postgres", "start")
    await stage.lab.start_agent(target)
    return f"{target} started again"


async def clock_skew(stage: Stage, target: str) -> str:
    offset = stage.rng.choice((-1, 1)) * stage.rng.randint(5, 30)
    faketime = shutil.which("faketime")
    if faketime is None:
        raise LabError("faketime is not installed (deploy/lab/install-system-deps.sh)")
    await stage.lab.server(target, "agent").stop()
    argv = [faketime, "-f", f"{offset:+d}s", *stage.lab.agent_command(target)]
    await stage.lab.start_agent(target, argv)
    return f"agent of {target} restarted with its clock {offset:+d}s off"


async def true_clock(stage: Stage, target: str) -> str:
    await stage.lab.server(target, "agent").stop()
    await stage.lab.start_agent(target, stage.lab.agent_command(target))
    return f"agent of {target} restarted on the true clock"


async def nothing(stage: Stage, target: str) -> str:
    return "nothing to heal"


FAULTS: dict[str, tuple[Step, Step]] = {
    "kill": (kill, unkill),
    "pause-holder": (pause_holder, unpause),
    "partition": (partition, heal_links),
    "partition-one-way": (partition_one_way, heal_links),
    "slow-link": (slow_link, fast_link),
    "etcd-quorum": (etcd_quorum, etcd_back),
    "flip-byte": (flip_byte, nothing),
    "isolate": (isolate, heal_links),
    "kill-region": (kill_region, revive_region),
    "clock-skew": (clock_skew, true_clock),
}


async def heal_everything(stage: Stage) -> None:
    """After the last fault: every link, every suspended or killed process back, every
    agent on the true clock."""
    await unpause(stage, "holder")
    for member in ("a", "b", "witness"):
        await stage.lab.fault(member, "etcd", "resume")
    for region in ("a", "b"):
        await fast_link(stage, region)
    stage.lab.heal()
    await stage.lab.up()  # idempotent: starts whatever is down
    for region in ("a", "b"):
        argv = stage.lab.agent_command(region)
        if "faketime" in " ".join(stage.lab.state.get("agents", {}).get(region, [])):
            await stage.lab.server(region, "agent").stop()
        try:
            await stage.lab.start_agent(region, argv)
        except LabError:
            await asyncio.sleep(1.0)
            await stage.lab.start_agent(region, argv)
    if stage.drill.standby is not None and not stage.drill.standby.is_running():
        await stage.drill.standby.start()
