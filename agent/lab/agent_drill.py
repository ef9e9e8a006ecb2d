"""A failover drill with real agents, each inside its region's network namespace.

``Drill`` (``agent.lab.failover_drill``) runs both coordinators in the
caller's process, so their traffic leaves from the host and passes any cut
link. ``AgentDrill`` needs a ``netns`` lab: each region's coordinator runs in
that region's agent (``dragent run`` with ``[failover]`` and one slow
synthetic stream),
started by ``Lab.start_agent`` inside the region's namespace, so a partition
(``Lab.partition``) cuts exactly what that region sees:

- region b's standby is a streaming replica of a's PostgreSQL, in b's
  namespace (replication crosses the a–b link);
- each agent's etcd endpoints are its own member, then the witness's, then
  the other region's: a region whose member lost its leader still reaches the
  cluster through another member (the lease client moves on after a failure);
- timing as ``Drill``'s (``FAST``), and each drill has its own etcd prefix;
- ``Watch`` samples both agents' ``/status`` and keeps every change of role,
  epoch, fenced and lease; ``logged`` reads when an agent logged an event
  (``fenced``: the moment the region's own fencing finished).

The drill writes the lab's ``agent.toml`` of each region for its agents and
writes the lab's own back on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from agent.lab import REGIONS, Lab, LabError
from agent.lab.bind import BindServer
from agent.lab.failover_drill import DrillRig, region_data
from agent.lab.processes import poll

SAMPLE_EVERY = 0.05


async def agent_status(url: str) -> dict[str, Any] | None:
    """An agent's ``/status``, or None while it does not answer within a second."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session,
            session.get(f"{url}/status") as response,
        ):
            return await response.json() if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None


@dataclass(frozen=True)
class Sample:
    """One region's failover state at one wall-clock instant."""

    at: float
    role: str
    epoch: int
    fenced: bool
    holding: bool
    leader: str | None
    decision: str | None

    @property
    def state(self) -> tuple[str, int, bool, bool]:
        return self.role, self.epoch, self.fenced, self.holding


class AgentDrill(DrillRig):
    """Both regions' agents on a ``netns`` lab, with a standby for b.

    ``async with AgentDrill(...)`` builds the standby, writes both configs and
    starts both agents; leaving stops them, removes the standby, writes the
    lab's configs back and leaves region a a writable primary."""

    def __init__(
        self,
        lab: Lab,
        name: str,
        workdir: Path,
        dns: BindServer | None = None,
        failover: dict[str, Any] | None = None,
    ) -> None:
        if not lab.network.isolated:
            raise LabError("an AgentDrill needs a lab in network namespaces (Lab(..., 'netns'))")
        super().__init__(lab, name, workdir, dns, failover)
        self.log_offset: dict[str, int] = {}  # where each agent log stood when the drill began

    @property
    def lease_ttl(self) -> float:
        return float(self.config("a")["failover"]["lease_ttl"])

    def url(self, region: str) -> str:
        return self.lab.agent_url(region)

    async def __aenter__(self) -> AgentDrill:
        await self.build_standby()
        for region in REGIONS:
            self.lab.write_agent_config(region, self.config(region))
            self.log_offset[region] = _size(self.lab.server(region, "agent").log_file)
        for region in REGIONS:
            await self.lab.start_agent(region)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for region in REGIONS:
            await self.lab.server(region, "agent").stop()
            self.lab.write_agent_config(region)
        await self.remove_standby()

    def config(self, region: str) -> dict[str, Any]:
        """The agent config (a dict) of ``region`` in this drill."""
        other = next(r for r in REGIONS if r != region)
        data = region_data(
            self.lab,
            region,
            **self.options(region),
            etcd=[self.lab.etcd_endpoint(m) for m in (region, "witness", other)],
            **self.failover,
        )
        # one slow synthetic stream of its own: an agent runs while it has streams
        stream = {"name": self.name[:63], "kind": "synthetic", "synthetic": {"rate": 20.0}}
        data["streams"] = [stream]
        data["failover"]["enabled"] = True
        return data

    async def status(self, region: str) -> dict[str, Any] | None:
        """The failover part of ``region``'s agent ``/status`` (None: no answer)."""
        answer = await agent_status(self.url(region))
        return answer.get("failover") if answer else None

    async def ready(self, within: float = 60.0) -> None:
        """Wait until a holds the lease unfenced and b follows it, fenced, with a
        known lag."""

        async def steady() -> bool:
            a, b = await self.status("a"), await self.status("b")
            if a is None or b is None:
                return False
            writable = a["role"] == "active" and not a["fenced"] and a["holding_lease"]
            following = b["leader"] == "a" and b["fenced"]
            return writable and following and b["lag_seconds"] is not None

        try:
            async with asyncio.timeout(within):
                await poll(steady, 0.1)
        except TimeoutError:
            states = {r: await self.status(r) for r in REGIONS}
            raise LabError(
                f"the drill's agents did not settle within {within:g}s: {states}"
            ) from None

    def logged(self, region: str, event: str, logger: str = "failover") -> list[float]:
        """Wall-clock times at which ``region``'s agent logged ``event`` in this drill."""
        log = self.lab.server(region, "agent").log_file
        times: list[float] = []
        with contextlib.suppress(OSError), log.open("rb") as f:
            f.seek(self.log_offset.get(region, 0))
            for raw in f:
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(line, dict) or "ts" not in line:
                    continue
                if line.get("event") == event and line.get("logger") == logger:
                    times.append(datetime.fromisoformat(line["ts"]).timestamp())
        return times


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@dataclass
class Watch:
    """Samples of both agents' failover state, every ``every`` seconds until stopped."""

    drill: AgentDrill
    every: float = SAMPLE_EVERY
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {r: [] for r in REGIONS})

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for region in REGIONS:
                status = await self.drill.status(region)
                if status is not None:
                    self.samples[region].append(_sample(status))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.every):
                    await stop.wait()

    def states(self, region: str) -> list[tuple[str, int, bool, bool]]:
        """The distinct (role, epoch, fenced, holding) of ``region``, in order seen."""
        out: list[tuple[str, int, bool, bool]] = []
        for s in self.samples[region]:
            if not out or out[-1] != s.state:
                out.append(s.state)
        return out

    def decisions(self, region: str) -> set[str]:
        return {s.decision for s in self.samples[region] if s.decision}


def _sample(status: dict[str, Any]) -> Sample:
    return Sample(
        at=time.time(),
        role=status["role"],
        epoch=int(status["epoch"]),
        fenced=bool(status["fenced"]),
        holding=bool(status["holding_lease"]),
        leader=status.get("leader"),
        decision=status.get("decision"),
    )
