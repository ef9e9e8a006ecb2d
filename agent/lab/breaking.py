"""What the lab shows and how it is broken (a mixin of ``Lab``): the status of every
server, ``fault`` (kill, stop, pause, restart a service or a whole region), and, in a
``netns`` lab, cutting and healing links."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import asdict
from typing import Any, get_args

from agent.lab import partitions
from agent.lab.members import KINDS, Action, Service, _never_ran
from agent.lab.network import Network
from agent.lab.processes import LabError, Server, run_all


class Breaking:
    """Methods of ``Lab``: they read its servers and network."""

    members: tuple[str, ...]

    # -- status and faults -------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Per member and service: state (running, paused, stopped), pid, port, endpoint;
        the network mode, each member's address and namespace, and the cut links."""
        regions: dict[str, dict[str, Any]] = {}
        for where in self.members:
            kinds = ("etcd",) if where == "witness" else (*KINDS, "agent")
            regions[where] = {k: self._service_status(self.server(where, k)) for k in kinds}
        net = self.network
        return {
            "root": str(self.root),
            "slot": self.slot,
            "network": net.mode,
            "members": {m: asdict(net.place(m)) for m in self.members},
            "partitions": [list(p) for p in self.partitions()],
            "regions": regions,
        }

    @staticmethod
    def _service_status(s: Server) -> dict[str, Any]:
        pid = s.pid
        state = "stopped" if pid is None else "paused" if s.is_paused() else "running"
        if pid is None and s.kind == "agent" and _accepts(s.host, s.ports[0]):
            state = "running"  # an agent this lab did not start (a demo, a test, by hand)
        return {
            "state": state,
            "running": state != "stopped",
            "pid": pid,
            "port": s.ports[0],
            "endpoint": s.endpoint,
        }

    async def fault(self, region: str, service: Service, action: Action) -> None:
        """Break or repair one service of a region (``"witness"``: etcd only).

        ``kill`` is SIGKILL of the whole process tree; ``stop`` is graceful;
        ``start`` starts and waits until ready; ``restart`` is stop then start;
        ``pause``/``resume`` are SIGSTOP/SIGCONT. ``"all"`` acts on every server of
        the region and on its agent if it has a pid file (stopping the agent first
        and starting it last). An agent is started with the command given to
        ``start_agent``, else ``agent_command``. Raises ``LabError`` for an unknown
        combination or a server that does not come back.
        """
        if action not in get_args(Action):
            raise LabError(f"unknown action {action!r}: expected {', '.join(get_args(Action))}")
        if region == "witness":
            kinds: list[str] = ["etcd"] if service in ("etcd", "all") else [service]
        else:
            kinds = [*KINDS, "agent"] if service == "all" else [service]
        servers = [self.server(region, k) for k in kinds]
        if service == "all":
            servers = [s for s in servers if not _never_ran(s)]
        agents = [s for s in servers if s.kind == "agent"]
        others = [s for s in servers if s.kind != "agent"]
        if action in ("kill", "stop", "restart"):
            for group in (agents, others):
                await run_all(s.kill() if action == "kill" else s.stop() for s in group)
        if action in ("start", "restart"):
            for group in (others, agents):
                await self._start(group)
        if action == "pause":
            paused = [s for s in agents + others if s.is_running() or service != "all"]
            for s in paused:
                s.pause()
            # SIGSTOP is delivered asynchronously: return once every process shows stopped
            # (polling /proc: no event tells us; bounded to 5 s)
            for _ in range(500):
                if all(s.is_paused() for s in paused):
                    break
                await asyncio.sleep(0.01)
        if action == "resume":
            for s in others + agents:
                s.resume()

    # -- links (netns labs) ------------------------------------------------------

    def partition(self, x: str, y: str) -> None:
        """Cut the link between members ``x`` and ``y``: every packet between their
        addresses is dropped, both ways, silently (TCP times out). Their links with
        every other member and with the host stay. Idempotent.

        Raises ``LabError`` for an unknown member, ``x == y``, or a loopback lab."""
        partitions.cut(self._isolated("partition"), x, y)

    def heal(self, x: str | None = None, y: str | None = None) -> None:
        """Restore the link ``x``–``y``; every link of ``x`` if ``y`` is None; every
        link if both are. Idempotent. Raises ``LabError`` like ``partition``."""
        net = self._isolated("heal")
        partitions.restore(net, x, y)
        if x is None and y is None:
            partitions.restore_one_way(net)

    def partition_one_way(self, x: str, y: str) -> None:
        """Drop every packet from member ``x`` to member ``y``; ``y``'s still reach ``x``.
        Healed by ``heal()`` (every link). Raises ``LabError`` like ``partition``."""
        partitions.cut_one_way(self._isolated("partition"), x, y)

    def partitions(self) -> list[tuple[str, str]]:
        """The cut links, as member pairs in member order (none in a loopback lab)."""
        return partitions.links(self.network) if self.network.isolated else []

    def _isolated(self, what: str) -> Network:
        net = self.network
        if not net.isolated:
            raise LabError(
                f"cannot {what} links: the lab at {self.root} runs every member on 127.0.0.1",
                hint="start a lab in network namespaces: `dragent lab up --netns --dir DIR` "
                "(as root), or Lab(root, network='netns')",
            )
        return net


def _accepts(host: str, port: int) -> bool:
    """True if something listens on ``host:port`` (a connect within 0.2 s)."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False
