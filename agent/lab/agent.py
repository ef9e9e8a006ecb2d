"""A region's agent as the lab sees it: a pid file, a log and an HTTP port.

``Lab.start_agent`` runs it (``python -m agent run --config ...`` unless told
otherwise). The process is recognised by its command line naming the region's
``agent.toml`` (the marker), so a pid file written by any launcher works for
``fault()`` as long as the command names that path. In a ``netns`` lab the
agent starts inside its region's namespace and listens on the region's address.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from agent.lab.network import LOOPBACK, Place
from agent.lab.ports import accepts
from agent.lab.processes import Server, spawn

KIND = "agent"


class AgentServer(Server):
    """One region's agent; ``start()`` runs ``argv``."""

    kind: ClassVar[str] = KIND
    # The agent drains on SIGTERM (a bounded final sync) before it exits.
    stop_timeout: ClassVar[float] = 25.0
    ready_timeout: ClassVar[float] = 60.0

    def __init__(
        self,
        where: str,
        region_dir: Path,
        port: int,
        argv: Sequence[str] = (),
        place: Place = LOOPBACK,
    ) -> None:
        self.port = port
        self.argv = list(argv)
        super().__init__(
            where,
            pid_file=region_dir / "agent.pid",
            log_file=region_dir / "agent.log",
            marker=str(region_dir / "agent.toml"),
            ports=[port],
            place=place,
        )

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Run ``argv`` detached unless the agent runs; return without waiting."""
        if self.is_running():
            return
        spawn(self.place.wrap(self.argv), log=self.log_file, pid_file=self.pid_file)

    async def probe(self) -> bool:
        return await accepts(self.port, self.host)
