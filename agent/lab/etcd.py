"""A lab etcd member: one of the three (regions a and b, and the witness) that hold the lease.

Layout under ``<member dir>/etcd``: ``data/``, ``etcd.pid``, ``etcd.log``. The
cluster is bootstrapped with ``--initial-cluster-state new`` and a token unique
to the lab; once a member has data, etcd ignores the bootstrap flags, so the
same command restarts it. A member serves clients only while the cluster has
a quorum, so ``probe()`` (``GET /health``) passes only then; ``listening()``
tells whether the process at least took its client port.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from agent.lab.ports import accepts, http_get
from agent.lab.processes import LabError, Server, spawn

KIND = "etcd"


def find_etcd() -> Path:
    if which := shutil.which("etcd"):
        return Path(which)
    raise LabError("the `etcd` binary was not found", hint="install etcd-server (etcd 3.4+)")


def peer_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def initial_cluster(peer_ports: Mapping[str, int]) -> str:
    """etcd's ``--initial-cluster`` value for members named by ``peer_ports``' keys."""
    return ",".join(f"{name}={peer_url(port)}" for name, port in peer_ports.items())


class EtcdMember(Server):
    """One etcd member named ``where`` ("a", "b" or "witness")."""

    kind: ClassVar[str] = KIND
    # A stopping leader tries for seconds to hand leadership to peers that stop at
    # the same moment; etcd's fsynced WAL makes the SIGKILL after this safe.
    stop_timeout: ClassVar[float] = 2.0

    def __init__(
        self,
        where: str,
        member_dir: Path,
        client_port: int,
        peer_port: int,
        cluster: str,
        token: str,
    ) -> None:
        self.home = member_dir / "etcd"
        self.data_dir = self.home / "data"
        self.client_port = client_port
        self.peer_port = peer_port
        self.cluster = cluster
        self.token = token
        super().__init__(
            where,
            pid_file=self.home / "etcd.pid",
            log_file=self.home / "etcd.log",
            marker=f"--data-dir={self.data_dir}",
            ports=[client_port, peer_port],
        )

    @property
    def name(self) -> str:
        return "etcd for the witness" if self.where == "witness" else super().name

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def argv(self) -> list[str]:
        options = {
            "name": self.where,
            "data-dir": self.data_dir,
            "listen-client-urls": self.endpoint,
            "advertise-client-urls": self.endpoint,
            "listen-peer-urls": peer_url(self.peer_port),
            "initial-advertise-peer-urls": peer_url(self.peer_port),
            "initial-cluster": self.cluster,
            "initial-cluster-token": self.token,
            "initial-cluster-state": "new",
            "logger": "zap",
            "log-outputs": "stderr",
        }
        return [str(find_etcd()), *(f"--{k}={v}" for k, v in options.items())]

    async def start(self) -> None:
        """Start the member detached; return without waiting for readiness. Idempotent."""
        if self.is_running():
            return
        self.home.mkdir(parents=True, exist_ok=True)
        spawn(self.argv(), log=self.log_file, pid_file=self.pid_file)

    async def probe(self) -> bool:
        answer = await http_get(self.client_port, "/health")
        return answer is not None and answer[0] == 200 and b'"true"' in answer[1]

    async def listening(self) -> bool:
        """True if the member's client port accepts connections (quorum or not)."""
        return await accepts(self.client_port)
