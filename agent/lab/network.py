"""The lab's address plan: on which address, and in which network namespace, each
member's servers run.

Two modes, recorded in the lab's state file:

- ``loopback`` (the default): every member listens on 127.0.0.1 in the host's
  namespace; members differ only by port (``agent.lab.ports``).
- ``netns``: each member (a, b, witness) of slot N has a namespace
  ``drgN-<member>`` and one address ``10.77.N.<i>`` (a 1, b 2, witness 3) on a
  veth whose host end is on the bridge ``drgN-br`` (``10.77.N.254``). The
  host's side of the bridge is where the lab's shared servers (DNS) listen and
  where tests and people reach every member from. ``agent.lab.netns`` builds
  it; ``agent.lab.partitions`` cuts links between members.

Ports are the slot's in both modes. Pure: nothing here touches the system.
"""

from __future__ import annotations

import ipaddress
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

Mode = Literal["loopback", "netns"]
MODES: tuple[Mode, ...] = get_args(Mode)
LOOPBACK_ADDRESS = "127.0.0.1"
HOST_INDEX = {"a": 1, "b": 2, "witness": 3}
BRIDGE_INDEX = 254
PREFIX_LENGTH = 24


def ip_program() -> str:
    """iproute2's ``ip``, as an absolute path (servers are spawned without a PATH search)."""
    return shutil.which("ip") or "/usr/sbin/ip"


@dataclass(frozen=True)
class Place:
    """Where one server runs: the address it listens on and its network namespace
    (None: the host's)."""

    address: str = LOOPBACK_ADDRESS
    namespace: str | None = None

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this place's namespace (``ip netns exec``), else unchanged."""
        if self.namespace is None:
            return list(argv)
        return [ip_program(), "netns", "exec", self.namespace, *argv]


LOOPBACK = Place()


@dataclass(frozen=True)
class Network:
    """The address plan of the lab in ``slot`` in ``mode``."""

    mode: Mode
    slot: int

    @property
    def isolated(self) -> bool:
        """True when members have namespaces of their own (links can be cut)."""
        return self.mode == "netns"

    def place(self, where: str) -> Place:
        """The place of a member ("a", "b", "witness") or of ``"shared"`` servers
        (the host's namespace, on the bridge)."""
        if not self.isolated:
            return LOOPBACK
        if where == "shared":
            return Place(self.bridge_address)
        return Place(f"{self._prefix}.{HOST_INDEX[where]}", self.namespace(where))

    def address(self, where: str) -> str:
        return self.place(where).address

    def namespace(self, member: str) -> str:
        return f"drg{self.slot}-{member}"

    def host_link(self, member: str) -> str:
        """The host end of the member's veth pair (the namespace end is ``eth0``)."""
        return f"drg{self.slot}-{member}"

    @property
    def bridge(self) -> str:
        return f"drg{self.slot}-br"

    @property
    def bridge_address(self) -> str:
        return f"{self._prefix}.{BRIDGE_INDEX}" if self.isolated else LOOPBACK_ADDRESS

    @property
    def subnet(self) -> str:
        """The network every client of the lab's servers comes from (PostgreSQL trusts it)."""
        if not self.isolated:
            return f"{LOOPBACK_ADDRESS}/32"
        return str(ipaddress.ip_network(f"{self._prefix}.0/{PREFIX_LENGTH}"))

    def member_at(self, address: str) -> str | None:
        """The member whose address is ``address``, or None."""
        return next((m for m in HOST_INDEX if self.address(m) == address), None)

    @property
    def _prefix(self) -> str:
        return f"10.77.{self.slot}"
