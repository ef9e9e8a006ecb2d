"""A lab etcd member: one of the three (regions a and b, and the witness) that hold the lease.

Layout under ``<member dir>/etcd``: ``data/``, ``etcd.pid``, ``etcd.log``. The
cluster is bootstrapped with ``--initial-cluster-state new`` and a token unique
to the lab; once a member has data, etcd ignores the bootstrap flags, so the
same command restarts it. A member serves clients only while the cluster has
a quorum, so ``probe()`` (``GET /health``) passes only then; ``listening()``
tells whether the process at least took its client port. Each member listens
on its place's address (``agent.lab.network``); ``initial_cluster`` names every
member's peer URL. ``member_ids`` and ``move_leader`` (through ``etcdctl``)
tell and choose which member leads, for scenarios that depend on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from agent.lab.network import LOOPBACK, Place
from agent.lab.ports import accepts, http_get
from agent.lab.processes import LabError, Server, spawn

KIND = "etcd"


def find_etcd() -> Path:
    if which := shutil.which("etcd"):
        return Path(which)
    raise LabError("the `etcd` binary was not found", hint="install etcd-server (etcd 3.4+)")


def peer_url(port: int, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port}"


def initial_cluster(peer_urls: Mapping[str, str]) -> str:
    """etcd's ``--initial-cluster`` value for members named by ``peer_urls``' keys."""
    return ",".join(f"{name}={url}" for name, url in peer_urls.items())


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
        place: Place = LOOPBACK,
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
            place=place,
        )

    @property
    def name(self) -> str:
        return "etcd for the witness" if self.where == "witness" else super().name

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    def argv(self) -> list[str]:
        options = {
            "name": self.where,
            "data-dir": self.data_dir,
            "listen-client-urls": self.endpoint,
            "advertise-client-urls": self.endpoint,
            "listen-peer-urls": peer_url(self.peer_port, self.host),
            "initial-advertise-peer-urls": peer_url(self.peer_port, self.host),
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
        spawn(self.place.wrap(self.argv()), log=self.log_file, pid_file=self.pid_file)

    async def probe(self) -> bool:
        answer = await http_get(self.client_port, "/health", self.host)
        return answer is not None and answer[0] == 200 and b'"true"' in answer[1]

    async def listening(self) -> bool:
        """True if the member's client port accepts connections (quorum or not)."""
        return await accepts(self.client_port, self.host)


def find_etcdctl() -> Path:
    if which := shutil.which("etcdctl"):
        return Path(which)
    raise LabError("the `etcdctl` binary was not found", hint="install etcd-client (etcd 3.4+)")


async def _etcdctl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(find_etcdctl()),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "ETCDCTL_API": "3"},
    )
    try:
        async with asyncio.timeout(10.0):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise LabError(f"etcdctl {args[-1]} did not answer within 10s") from None
    if proc.returncode:
        raise LabError(f"etcdctl {' '.join(args[1:])} failed: {err.decode().strip()}")
    return out.decode()


async def member_ids(endpoints: Mapping[str, str]) -> tuple[dict[str, int], str | None]:
    """Each member's id (by name, from ``endpoints``: name -> client URL) and the
    name of the current leader (None if no member knows one)."""
    raw = await _etcdctl(
        f"--endpoints={','.join(endpoints.values())}", "endpoint", "status", "-w", "json"
    )
    by_url = {url: name for name, url in endpoints.items()}
    ids: dict[str, int] = {}
    leader_id = 0
    for entry in json.loads(raw):
        ids[by_url[entry["Endpoint"]]] = int(entry["Status"]["header"]["member_id"])
        leader_id = leader_id or int(entry["Status"].get("leader", 0))
    leader = next((name for name, i in ids.items() if i == leader_id), None)
    return ids, leader


async def move_leader(endpoints: Mapping[str, str], to: str) -> None:
    """Make member ``to`` the etcd leader (``etcdctl move-leader``; no-op if it is).
    ``endpoints``: every member's name -> client URL. Raises ``LabError``."""
    ids, leader = await member_ids(endpoints)
    if leader is None:
        raise LabError("the etcd cluster has no leader to hand over from")
    if leader != to:
        await _etcdctl(f"--endpoints={endpoints[leader]}", "move-leader", format(ids[to], "x"))
