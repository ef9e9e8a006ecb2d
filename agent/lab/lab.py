"""The lab: regions "a" and "b" (and "c") and a witness on one machine, with real servers.

Each region has a PostgreSQL cluster, a SeaweedFS S3 store and an etcd member;
the witness has only an etcd member. A lab runs two regions unless made with
``regions=3`` (``dragent lab up --regions 3``): then region c, like b, is a
passive region of a, the etcd cluster has four members (a, b, c, witness) and
each region's ``agent.toml`` lists the two others as peers. The count is
chosen when the lab is first brought up and kept in its state file.
``Lab.up()`` brings them up detached (they outlive the process that started
them) and writes what the agents need: the S3 credentials, one key-encryption
key per region and one ``agent.toml`` per region. ``up()`` does not start the
agents: ``start_agent()`` does, or any launcher that writes
``root/<region>/agent.pid``; the lab reserves their ports and ``fault()`` acts on
them through that pid file.

The network mode is chosen when the lab is first brought up and kept in its
state file: ``loopback`` (default: every server on 127.0.0.1 in the host's
namespace) or ``netns`` (each member in a network namespace of its own with an
address of its own, see ``agent.lab.network``; links between members can be
cut with ``partition()`` and restored with ``heal()``). Every endpoint the lab
hands out (DSNs, URLs, agent configs) uses the member's address.

Layout of ``root``::

    lab.json                slot, network mode, regions, ports, etcd token, agent commands
                            (the state file)
    secrets/                S3 access and secret key files, SeaweedFS identity file
    a/ b/ (c/)              agent.toml, kek.key, report-signing.key, agent/ (data_dir),
                            agent.pid, agent.log, pg/, s3/, etcd/
    witness/etcd/
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from agent.lab import netns, partitions
from agent.lab import ports as lab_ports
from agent.lab.agent import AgentServer
from agent.lab.breaking import Breaking
from agent.lab.etcd import EtcdMember, initial_cluster, peer_url
from agent.lab.members import (
    DATA_BUCKET,
    KINDS,
    REGION_COUNTS,
    STATE_VERSION,
    VAULT_BUCKET,
    lab_members,
    lab_regions,
)
from agent.lab.network import MODES, Mode, Network
from agent.lab.postgres import PostgresServer, sweep_orphans
from agent.lab.processes import LabError, Server, poll, run_all
from agent.lab.seaweed import S3Credentials, SeaweedServer, ensure_buckets
from replicators.keys import generate_key_file


class Lab(Breaking):
    """A lab rooted at ``root``; ``slot`` picks its port block (default: first free);
    ``network`` its mode, ``"loopback"`` or ``"netns"`` (default: the recorded one,
    else loopback); ``regions`` how many regions it runs, 2 or 3 (default: the recorded
    count, else 2).

    Constructing a Lab starts nothing; an existing ``root/lab.json`` is read,
    so a later process finds the same slot, ports and network. Endpoint accessors
    raise ``LabError`` until the lab has a slot (after the first ``up()``).
    """

    def __init__(
        self,
        root: Path | str,
        slot: int | None = None,
        network: Mode | None = None,
        regions: int | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.state_file = self.root / "lab.json"
        self.secrets_dir = self.root / "secrets"
        self._state = self._load_state()
        if self._state and slot is not None and self._state["slot"] != slot:
            raise LabError(f"the lab at {self.root} uses slot {self._state['slot']}, not {slot}")
        if network is not None and network not in MODES:
            raise LabError(f"unknown network mode {network!r}: expected {', '.join(MODES)}")
        recorded = self._state.get("network", "loopback") if self._state else None
        if recorded is not None and network is not None and recorded != network:
            raise LabError(
                f"the lab at {self.root} runs in {recorded} mode, not {network}",
                hint="`dragent lab down --purge` it first to change its network",
            )
        if regions is not None and regions not in REGION_COUNTS:
            raise LabError(f"a lab runs 2 or 3 regions, not {regions}")
        counted = int(self._state.get("regions", 2)) if self._state else None
        if counted is not None and regions is not None and counted != regions:
            raise LabError(
                f"the lab at {self.root} runs {counted} regions, not {regions}",
                hint="`dragent lab down --purge` it first to change its regions",
            )
        if regions == 3 and network == "netns":
            raise LabError("a three-region lab runs on loopback only (no --netns)")
        self._requested_slot = slot
        self._requested_regions = regions or 2
        self._requested_network: Mode = network or "loopback"
        self._fresh = False

    # -- state ---------------------------------------------------------------

    def _load_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LabError(f"cannot read the lab state {self.state_file}: {exc}") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise LabError(f"{self.state_file} is not a lab state file of version {STATE_VERSION}")
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.state_file)
        self._state = state

    def _new_state(self, slot: int) -> None:
        token = f"dragent-lab-{secrets.token_hex(6)}"
        ports = lab_ports.slot_ports(slot)
        state = {"version": STATE_VERSION, "slot": slot, "ports": ports, "etcd_token": token}
        state["regions"] = self._requested_regions
        if self._requested_network != "loopback":
            state["network"] = self._requested_network
        self._save_state(state)
        self._fresh = True

    @property
    def state(self) -> dict[str, Any]:
        if self._state is None:
            raise LabError(f"there is no lab at {self.root}", hint="run `dragent lab up` first")
        return self._state

    @property
    def exists(self) -> bool:
        return self._state is not None

    @property
    def regions(self) -> tuple[str, ...]:
        """The lab's regions: ("a", "b"), or ("a", "b", "c") in a three-region lab
        (before the first ``up()``: the requested ones)."""
        count = self._state.get("regions", 2) if self._state else self._requested_regions
        return lab_regions(int(count))

    @property
    def members(self) -> tuple[str, ...]:
        """The etcd members: the regions and the witness."""
        return lab_members(len(self.regions))

    @property
    def slot(self) -> int:
        return int(self.state["slot"])

    @property
    def ports(self) -> dict[str, int]:
        """Every port of the lab, keyed ``"<where>.<service>"`` (see ``agent.lab.ports``)."""
        return dict(self.state["ports"])

    @property
    def network(self) -> Network:
        """The lab's address plan: each member's address and namespace."""
        return Network(self.state.get("network", "loopback"), self.slot)

    def address(self, where: str) -> str:
        """The address a member's servers listen on ("shared": the DNS server's)."""
        if where != "shared":
            self.region_dir(where)  # validates the name
        return self.network.address(where)

    def port(self, where: str, service: str) -> int:
        try:
            return int(self.state["ports"][f"{where}.{service}"])
        except KeyError:
            raise LabError(f"the lab has no port {where}.{service}") from None

    # -- endpoints -------------------------------------------------------------

    def region_dir(self, where: str) -> Path:
        if where not in self.members:
            raise LabError(f"unknown region {where!r}: expected one of {', '.join(self.members)}")
        return self.root / where

    def pg_dsn(self, region: str, database: str = "app") -> str:
        """``postgresql://dragent@ADDRESS:PORT/app``: a trusted superuser with REPLICATION."""
        where = f"{self.address(region)}:{self.port(region, 'postgres')}"
        return f"postgresql://dragent@{where}/{database}"

    def s3_endpoint(self, region: str) -> str:
        return f"http://{self.address(region)}:{self.port(region, 's3')}"

    def etcd_endpoint(self, member: str) -> str:
        return f"http://{self.address(member)}:{self.port(member, 'etcd_client')}"

    @property
    def etcd_endpoints(self) -> list[str]:
        return [self.etcd_endpoint(m) for m in self.members]

    def agent_url(self, region: str) -> str:
        return f"http://{self.address(region)}:{self.port(region, 'agent')}"

    def config_path(self, region: str) -> Path:
        return self.region_dir(region) / "agent.toml"

    def key_path(self, region: str) -> Path:
        return self.region_dir(region) / "kek.key"

    @property
    def s3_credentials(self) -> S3Credentials:
        """The S3 identity of both regions (``root/secrets``)."""
        return S3Credentials.read(self.secrets_dir)

    # -- servers ---------------------------------------------------------------

    def server(self, where: str, kind: str) -> Server:
        """The server object of one service (``PostgresServer``, ``SeaweedServer``,
        ``EtcdMember`` or ``AgentServer``), e.g. for its data directory or log."""
        home = self.region_dir(where)
        place = self.network.place(where)
        if kind == "etcd":
            net = self.network
            members = self.members
            peers = {m: peer_url(self.port(m, "etcd_peer"), net.address(m)) for m in members}
            client, peer = self.port(where, "etcd_client"), self.port(where, "etcd_peer")
            cluster, token = initial_cluster(peers), self.state["etcd_token"]
            return EtcdMember(where, home, client, peer, cluster, token, place)
        if where == "witness":
            raise LabError(f"the witness runs only etcd, not {kind}")
        if kind == "postgres":
            return self.postgres(where)
        if kind == "s3":
            config = self.secrets_dir / "s3.json"
            return SeaweedServer(where, home, lab_ports.group(self.ports, where), config, place)
        if kind == "agent":
            argv = self.state.get("agents", {}).get(where) or self.agent_command(where)
            return AgentServer(where, home, self.port(where, "agent"), argv, place)
        raise LabError(f"unknown service {kind!r}: expected postgres, s3, etcd or agent")

    def postgres(self, region: str) -> PostgresServer:
        """The PostgreSQL server of ``region`` (its ``data_dir``, ``command()``, ...)."""
        return self.postgres_at(region, self.region_dir(region), self.port(region, "postgres"))

    def postgres_at(self, region: str, home: Path, port: int, name: str = "") -> PostgresServer:
        """A PostgreSQL cluster under ``home`` on ``port`` in ``region``'s place (its
        namespace and address), trusting the lab's network: for extra clusters
        such as a drill's standby."""
        net = self.network
        place = net.place(region)
        return PostgresServer(name or region, home, port, place=place, clients=net.subnet)

    def servers(self, kinds: Collection[str] = KINDS) -> list[Server]:
        """The servers of the given kinds, in region order (agents not included)."""
        return [self.server(w, k) for k in KINDS if k in kinds for w in self._members(k)]

    def _members(self, kind: str) -> tuple[str, ...]:
        return self.members if kind == "etcd" else self.regions

    # -- up / down ---------------------------------------------------------------

    async def up(self, services: Collection[str] = KINDS) -> None:
        """Bring the lab up: claim a slot, create what is missing, start what is not
        running (resuming what is paused), wait until each server is ready (within
        its ``ready_timeout``), create the buckets, write key files and agent configs.

        Idempotent. ``services`` limits which kinds start (all by default). A
        ``netns`` lab first makes its namespaces, links and bridge (``agent.lab.netns``).
        Raises ``LabError`` naming every server that failed, with its log's tail.
        """
        unknown = set(services) - set(KINDS)
        if unknown:
            raise LabError(f"unknown services {sorted(unknown)}: expected {', '.join(KINDS)}")
        wanted = self._state.get("network", "loopback") if self._state else self._requested_network
        if wanted == "netns" and (why := netns.unavailable()) is not None:
            raise LabError(f"the netns lab cannot run here: {why}", hint=netns.HOW_TO_RUN)
        self._claim()
        if self.network.isolated:
            # A slot claimed just now may hold what a crashed lab left: start clean.
            await netns.ensure(self.network, fresh=self._fresh)
            partitions.install(self.network)
            self._fresh = False
        sweep_orphans()
        S3Credentials.create(self.secrets_dir)
        self._write_keys()
        await self._start(self.servers(services))
        if "s3" in services:
            buckets = (VAULT_BUCKET, DATA_BUCKET)
            creds = self.s3_credentials
            await run_all(ensure_buckets(self.s3_endpoint(r), creds, buckets) for r in self.regions)
        for region in self.regions:
            (self.region_dir(region) / "agent").mkdir(exist_ok=True)
            self.write_agent_config(region)

    async def down(self, purge: bool = False) -> None:
        """Stop the agents, then every server (gracefully, SIGKILL after a timeout).

        With ``purge``, also delete everything the lab wrote under ``root`` and
        release its slot; a ``netns`` lab's namespaces, links, bridge and rules go
        too (without ``purge`` they stay, partitions included). Idempotent; a
        missing lab is not an error.
        """
        if self._state is None:
            return
        await run_all(self.server(r, "agent").stop() for r in self.regions)
        await run_all([*(s.stop() for s in self.servers(("postgres", "s3"))), self._stop_etcd()])
        if purge and self.network.isolated:
            await netns.remove(self.network)
        if purge:
            for region in self.regions:
                self.postgres(region).remove()
            for name in (*self.members, "secrets"):
                shutil.rmtree(self.root / name, ignore_errors=True)
            lab_ports.release_slot(self.root, self.slot)
            self.state_file.unlink(missing_ok=True)
            self._state = None
            with contextlib.suppress(OSError):
                self.root.rmdir()

    async def _stop_etcd(self) -> None:
        # One member at a time: a stopping leader hands over to a live peer at once,
        # but waits seconds for peers that are stopping at the same moment.
        for member in self.members:
            await self.server(member, "etcd").stop()

    def _claim(self) -> None:
        if self._state is not None:
            lab_ports.ensure_claim(self.root, self.slot)
        else:
            lab_ports.claim_slot(self.root, self._requested_slot, self._new_state)

    def _write_keys(self) -> None:
        for region in self.regions:
            self.region_dir(region).mkdir(parents=True, exist_ok=True)
            if not self.key_path(region).exists():
                generate_key_file(self.key_path(region))

    async def _start(self, servers: Sequence[Server]) -> None:
        """Start the servers that are not running, then wait for each to be ready."""
        for s in servers:
            s.resume()
            # (A member's own address is in its own namespace: only the lab uses it.)
            if not s.is_running() and s.place.namespace is None:
                busy = [p for p in s.ports if not lab_ports.port_is_free(p)]
                if busy:
                    raise LabError(f"{s.name} cannot start: ports {busy} are in use")
        await run_all(s.start() for s in servers)
        etcd_up = sum(self.server(m, "etcd").is_running() for m in self.members)
        quorum = etcd_up > len(self.members) // 2
        cut = {m for pair in self.partitions() for m in pair}
        await run_all(self._ready(s, quorum=quorum and s.where not in cut) for s in servers)

    @staticmethod
    async def _ready(server: Server, quorum: bool) -> None:
        # An etcd member without a quorum never answers /health: settle for its port.
        # So may a member with a cut link (its leader may be on the other side).
        if isinstance(server, EtcdMember) and not quorum:
            try:
                async with asyncio.timeout(server.ready_timeout):
                    await poll(server.listening)
            except TimeoutError:
                raise server.failure(f"did not listen within {server.ready_timeout:g}s") from None
            return
        await server.wait_ready()

    # -- agents --------------------------------------------------------------

    def agent_config(self, region: str) -> dict[str, Any]:
        """The agent.toml content of ``region``, as a dict that ``load_config`` accepts:
        every other region of the lab is a peer (its agent, vault and key)."""
        return {
            "region": region,
            "role": "active" if region == self.regions[0] else "passive",
            "data_dir": str(self.region_dir(region) / "agent"),
            # every agent of the region (tests start several) signs with one key
            "report_signing_key": str(self.region_dir(region) / "report-signing.key"),
            "vault": self._vault(region),
            "keys": {"provider": "local", "key_file": str(self.key_path(region))},
            "peers": [
                {
                    "name": peer,
                    "agent_url": self.agent_url(peer),
                    "vault": self._vault(peer),
                    "keys": {"provider": "local", "key_file": str(self.key_path(peer))},
                }
                for peer in self.regions
                if peer != region
            ],
            "streams": [{"name": "synthetic", "kind": "synthetic", "synthetic": {"rate": 200.0}}],
            "etcd": {"endpoints": self.etcd_endpoints},
            "http": {"listen": f"{self.address(region)}:{self.port(region, 'agent')}"},
            "log": {"format": "json"},
        }

    def write_agent_config(self, region: str, config: dict[str, Any] | None = None) -> Path:
        """Write ``region``'s ``agent.toml`` (atomically): ``config``, by default
        ``agent_config(region)``; return its path. A drill gives the lab's agents
        its own config this way (``up()`` writes the lab's again)."""
        path = self.config_path(region)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(tomli_w.dumps(config if config is not None else self.agent_config(region)))
        tmp.replace(path)
        return path

    def _vault(self, region: str) -> dict[str, Any]:
        return {
            "endpoint": self.s3_endpoint(region),
            "bucket": VAULT_BUCKET,
            "addressing_style": "path",
            "access_key": f"file:{self.s3_credentials.access_key_file}",
            "secret_key": f"file:{self.s3_credentials.secret_key_file}",
        }

    def agent_command(self, region: str) -> list[str]:
        """``python -m agent run --config <config_path>``: how the lab runs an agent
        unless ``start_agent`` was given another command."""
        return [sys.executable, "-m", "agent", "run", "--config", str(self.config_path(region))]

    async def start_agent(self, region: str, argv: Sequence[str] | None = None) -> int:
        """Start ``region``'s agent detached (``argv``, default ``agent_command``), in
        the region's namespace in a ``netns`` lab; wait until its HTTP port accepts
        connections; return its pid. ``argv`` must
        name the region's config path (that is how the lab recognises the process).
        The command is remembered: ``fault(region, "agent", "start")`` runs it again.
        No-op if the agent runs."""
        argv = list(argv) if argv is not None else self.agent_command(region)
        if str(self.config_path(region)) not in argv:
            raise LabError(f"the agent command must name {self.config_path(region)}")
        agents = {**self.state.get("agents", {}), region: list(argv)}
        self._save_state({**self.state, "agents": agents})
        agent = self.server(region, "agent")
        await self._start([agent])
        return agent.pid or 0
