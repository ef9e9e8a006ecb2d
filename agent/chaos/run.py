"""``dragent lab chaos``: the nemesis, the workload and the checker on a netns lab.

One run (``chaos``): a lab in network namespaces, both regions' agents as
real processes (``AgentDrill``: region b's standby streams from a's primary,
the DNS switch, fast failover timing), the clients of ``agent.chaos.workload``,
a sampler of both agents' ``/status`` (roles, epochs, fencing, the lag b
reports), and the nemesis running the seeded schedule of
``agent.chaos.schedule``, one fault at a time. Then everything is healed, a
quiet period lets the cluster settle with the clients still writing, the
clients stop, the final primary's rows and region b's vault are read, and
the checker judges the history (docs/chaos.md).

Writes ``history.jsonl``, ``verdict.json`` and ``timeline.html`` into ``out``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from agent.chaos import faults as F
from agent.chaos import workload
from agent.chaos.checker import check
from agent.chaos.history import HISTORY_VERSION, History, read_history
from agent.chaos.schedule import Fault, plan
from agent.chaos.timeline import render
from agent.config import AgentConfig, parse_config
from agent.failover_config import fencing_budget
from agent.lab import Lab, LabError
from agent.lab.agent_drill import AgentDrill, agent_status
from agent.lab.bind import lab_dns
from agent.lab.processes import poll
from replicators import logs
from replicators.errors import IntegrityError
from replicators.paths import StreamPaths
from replicators.synthetic import SyntheticTarget, make_record, parse_record, read_applied_log

QUIET = 20.0
SAMPLE_EVERY = 0.25
RPO_EVERY = 1.0
DEFAULT_FAULTS = tuple(F.TARGETS)


async def chaos(
    root: Path,
    out: Path,
    *,
    minutes: float,
    seed: int,
    faults: tuple[str, ...] = DEFAULT_FAULTS,
    sync: bool = False,
    rpo_target: float | None = None,
) -> dict[str, Any]:
    """One run (see the module docstring); returns the verdict. ``out`` must exist.

    ``rpo_target`` (default: ``loss_bound`` of the drill's configuration) is the age
    a write lost across a failover may have in the asynchronous mode."""
    log = logs.get("chaos", seed=seed)
    lab = Lab(root / "lab", network="netns")
    await lab.up()
    dns = lab_dns(lab)
    try:
        await dns.stop()
        await dns.start()
        await dns.wait_ready()
        await _point_dns_to_a(dns)
        history = History(out / "history.jsonl")
        async with ChaosDrill(lab, f"chaos-{seed}", root / "drill", dns=dns) as drill:
            await drill.ready(90)
            await workload.setup(drill, sync=sync)
            if rpo_target is None:
                rpo_target = loss_bound(parse_config(drill.config("a"), "chaos a"))
            start = {"minutes": minutes, "seed": seed, "sync": sync, "faults": list(faults)}
            history.write(
                {"type": "start", "version": HISTORY_VERSION, "rpo_target": rpo_target} | start
            )
            schedule = plan(seed, minutes * 60, list(faults), {f: F.TARGETS[f] for f in faults})
            stage = F.Stage(lab, drill, random.Random(seed))
            log.info("chaos starts", faults=len(schedule), minutes=minutes)
            await _run(stage, history, schedule, minutes * 60)
            await _final(stage, history)
    finally:
        with contextlib.suppress(Exception):
            lab.heal()
        await dns.stop()
        await lab.down(purge=True)
    return judge(out)


def judge(out: Path) -> dict[str, Any]:
    """Check ``out``'s history; write the verdict and the timeline beside it."""
    events = read_history(out / "history.jsonl")
    verdict = check(events)
    (out / "verdict.json").write_text(json.dumps(verdict, indent=2, sort_keys=True))
    (out / "timeline.html").write_text(render(events, verdict))
    return verdict


REPLICATION_RPO = 1.0
"""The PostgreSQL RPO target: what replication may lag when a partition begins."""


def loss_bound(cfg: AgentConfig) -> float:
    """How old a write lost across a failover may be in the asynchronous mode: a primary
    cut off from its standby goes on acknowledging writes until it has fenced itself, at
    most the fencing budget's worst case after its last renewal; add what replication
    may lag when the cut begins. Only the zero-loss mode loses nothing."""
    budget = fencing_budget(cfg.failover, cfg.etcd)
    return round(budget.worst_case + REPLICATION_RPO, 3)


class ChaosDrill(AgentDrill):
    """``AgentDrill`` with a keeper per region (``dragent keeper``, a process of its own
    on the host, beside its agent): a killed or suspended agent's database is fenced."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keepers: dict[str, asyncio.subprocess.Process] = {}

    def config(self, region: str) -> dict[str, Any]:
        data = super().config(region)
        data["failover"]["keeper_socket"] = str(self.workdir / f"keeper-{region}.sock")
        return data

    async def __aenter__(self) -> ChaosDrill:
        for region in ("a", "b"):
            self.lab.write_agent_config(region, self.config(region))
            argv = [sys.executable, "-m", "agent", "keeper"]
            log = (self.workdir / f"keeper-{region}.log").open("ab")
            self.keepers[region] = await asyncio.create_subprocess_exec(
                *argv, "--config", str(self.lab.config_path(region)), stdout=log, stderr=log
            )
            log.close()
        await super().__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await super().__aexit__(*exc)
        finally:
            for keeper in self.keepers.values():
                with contextlib.suppress(ProcessLookupError):
                    keeper.terminate()
                await keeper.wait()


async def _point_dns_to_a(dns: Any) -> None:
    from agent.failover_config import Rfc2136Switch
    from agent.switch.rfc2136 import Rfc2136

    switch = Rfc2136(Rfc2136Switch(**dns.switch_config()))
    await switch.point_to("a")
    await switch.forget_epoch()  # this run's etcd prefix starts its epochs over


async def _run(stage: F.Stage, history: History, schedule: list[Fault], seconds: float) -> None:
    """Clients and sampler for the whole run; the nemesis, then healing and quiet."""
    stop = asyncio.Event()
    began = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        for client in workload.clients(stage.drill, history):
            tg.create_task(client.run(stop))
        tg.create_task(_sample(stage.drill, history, stop))
        try:
            await _nemesis(stage, history, schedule, began)
            await asyncio.sleep(max(0.0, seconds - (time.monotonic() - began)))
            await F.heal_everything(stage)
            history.write({"type": "heal", "fault": "all", "target": "all"})
            await settled(stage.drill, 90)
            await asyncio.sleep(QUIET)
        finally:
            stop.set()


async def settled(drill: AgentDrill, within: float) -> None:
    """Wait until one region holds the lease unfenced and the other follows it, fenced
    (whichever region leads after the faults). Raises ``LabError`` with both states."""
    states: dict[str, Any] = {}

    async def steady() -> bool:
        for region in ("a", "b"):
            states[region] = await drill.status(region)
        leaders = [r for r, s in states.items() if s and s["role"] == "active"]
        if len(leaders) != 1:
            return False
        leader = leaders[0]
        other = states["b" if leader == "a" else "a"]
        lead = states[leader]
        ok_leader = lead is not None and lead["holding_lease"] and not lead["fenced"]
        return ok_leader and other is not None and other["leader"] == leader and other["fenced"]

    try:
        async with asyncio.timeout(within):
            await poll(steady, 0.2)
    except TimeoutError:
        raise LabError(f"the agents did not settle within {within:g}s: {states}") from None


async def _nemesis(stage: F.Stage, history: History, schedule: list[Fault], began: float) -> None:
    for fault in schedule:
        await asyncio.sleep(max(0.0, fault.at - (time.monotonic() - began)))
        inject, heal = F.FAULTS[fault.name]
        duration = fault.duration
        if fault.name == "pause-holder":
            duration = stage.drill.lease_ttl + 2.0
        until = time.time() + duration
        detail = await _step(inject, stage, fault.target)
        history.write(
            {"type": "fault", "fault": fault.name, "target": fault.target, "until": until}
            | {"detail": detail}
        )
        await asyncio.sleep(duration)
        detail = await _step(heal, stage, fault.target)
        history.write(
            {"type": "heal", "fault": fault.name, "target": fault.target, "detail": detail}
        )


async def _step(step: F.Step, stage: F.Stage, target: str) -> str:
    try:
        async with asyncio.timeout(60):
            return await step(stage, target)
    except Exception as exc:  # a fault that could not be made is recorded, the run goes on
        return f"failed: {type(exc).__name__}: {exc}"


async def _sample(drill: AgentDrill, history: History, stop: asyncio.Event) -> None:
    """``state`` events on every change of an agent's role, epoch or fencing; the lag
    region b reports (its RPO of the database) every second."""
    last: dict[str, tuple[Any, ...]] = {}
    next_rpo = 0.0
    while not stop.is_set():
        for region in ("a", "b"):
            status = await agent_status(drill.url(region))
            failover = status.get("failover") if status else None
            if not failover:
                continue
            state = (failover["role"], failover["epoch"], failover["fenced"])
            if last.get(region) != state:
                last[region] = state
                role, epoch, fenced = state
                history.write(
                    {"type": "state", "region": region, "role": role, "epoch": epoch}
                    | {"fenced": fenced}
                )
            if time.monotonic() >= next_rpo and failover.get("lag_seconds") is not None:
                lag = float(failover["lag_seconds"])
                history.write({"type": "rpo", "region": region, "stream": "postgres", "rpo": lag})
        if time.monotonic() >= next_rpo:
            next_rpo = time.monotonic() + RPO_EVERY
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SAMPLE_EVERY):
                await stop.wait()


async def _final(stage: F.Stage, history: History) -> None:
    """The final primary's rows and region b's vault, after the quiet period."""
    primary = await stage.primary()
    dsn = workload.dsns(stage.drill)[primary]
    status = await stage.drill.status(primary)
    history.write(
        {"type": "final", "primary": primary, "present": await workload.present(dsn)}
        | {"epoch": status["epoch"] if status else None}
    )
    history.write(await _vault(stage))
    history.write({"type": "end"})


async def _vault(stage: F.Stage) -> dict[str, Any]:
    """Region b's vault for the drill's stream, verified end to end; the segments the
    nemesis corrupted; and whether b's sink applied corrupted data: every record in its
    applied log must be the one the synthetic source makes for its index."""
    from agent.vaultcmd import verify_summary

    cfg = parse_config(stage.lab.agent_config("b"), "lab b")
    name = stage.drill.name[:63]
    summary = await verify_summary(cfg, name)
    target = SyntheticTarget(StreamPaths(stage.drill.workdir / "b", name).target)
    damaged = [i for i, ok in _applied_records(target) if not ok]
    return {
        "type": "vault",
        "ok": summary["ok"],
        "problem": summary["problem"],
        "damaged": summary["damaged"],
        "corrupted": stage.corrupted,
        "applied_corrupted": stage.corrupted if damaged else [],
        "applied_damaged_records": damaged[:20],
    }


def _applied_records(target: SyntheticTarget) -> list[tuple[int, bool]]:
    """(index, intact) of every record b's sink applied."""
    out = []
    for raw in read_applied_log(target.log_path):
        try:
            index, when, _ = parse_record(raw)
        except IntegrityError:
            out.append((-1, False))
            continue
        expected = make_record(index, when, len(raw), compressible=True)
        out.append((index, expected == raw))
    return out
