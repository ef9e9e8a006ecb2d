"""moto in server mode: one local server that speaks the wire protocols of AWS KMS,
Route 53 and SQS (every service on one port, told apart by the request).

moto pins its own botocore, so it runs from a virtualenv of its own (``.venv-moto``,
built by ``make venv``), never imported into the agent's. Like the lab's other
servers it is detached (``spawn``) and found again through its pid file and
cmdline marker; ``pause()`` (SIGSTOP) makes every service on it hang. It keeps
its state in memory only: a restart forgets every key, zone and queue.

Layout under its home: ``moto.pid``, ``moto.log``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import ClassVar

from agent.lab.network import LOOPBACK, Place
from agent.lab.ports import http_get
from agent.lab.processes import LabError, Server, spawn

KIND = "aws"
CHECKOUT = Path(__file__).resolve().parents[2]


def find_moto() -> Path:
    """``moto_server``: ``$DRAGENT_MOTO_SERVER``, else the checkout's ``.venv-moto``, else PATH."""
    named = os.environ.get("DRAGENT_MOTO_SERVER")
    if named:
        return Path(named)
    beside = CHECKOUT / ".venv-moto" / "bin" / "moto_server"
    if beside.exists():
        return beside
    if which := shutil.which("moto_server"):
        return Path(which)
    raise LabError(
        "moto's server (moto_server) was not found",
        hint="make venv  (builds .venv-moto with moto[server])",
    )


class MotoServer(Server):
    """moto's server on ``place``'s address and ``port``; ``endpoint`` is its URL."""

    kind: ClassVar[str] = KIND
    stop_timeout: ClassVar[float] = 5.0

    def __init__(
        self, home: Path, port: int, place: Place = LOOPBACK, where: str = "tests"
    ) -> None:
        self.home = home
        self.binary = find_moto()
        super().__init__(
            where,
            pid_file=home / "moto.pid",
            log_file=home / "moto.log",
            marker=f"{self.binary} -H {place.address} -p {port}",
            ports=[port],
            place=place,
        )

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.ports[0]}"

    def argv(self) -> list[str]:
        return [str(self.binary), "-H", self.host, "-p", str(self.ports[0])]

    async def start(self) -> None:
        """Start the server detached; return without waiting for readiness. Idempotent."""
        if self.is_running():
            return
        self.home.mkdir(parents=True, exist_ok=True)
        spawn(self.place.wrap(self.argv()), log=self.log_file, pid_file=self.pid_file)

    async def probe(self) -> bool:
        answer = await http_get(self.ports[0], "/moto-api/data.json", self.host)
        return answer is not None and answer[0] == 200
