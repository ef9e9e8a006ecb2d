"""The namespaces, veth pairs and bridge of a lab in ``netns`` mode.

``ensure(net)`` makes, for every member of ``net`` (``agent.lab.network``):
the namespace ``drgN-<member>`` with ``lo`` up; a veth pair whose namespace
end ``eth0`` holds the member's address and whose host end ``drgN-<member>``
is on the bridge ``drgN-br`` (the host's address ``10.77.N.254``). The rules
that cut links are ``agent.lab.partitions``'. It is idempotent: what exists is
kept (a running lab keeps its servers and its partitions). With
``fresh`` it first removes whatever a crashed earlier lab on the same slot
left. ``remove(net)`` kills every process still inside the slot's namespaces
and deletes the namespaces (their veth ends and rules go with them), the host
ends and the bridge.

Only names of the lab's own slot are ever touched: labs on other slots run
beside it. Needs root and iproute2; ``unavailable()`` says why it cannot run.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from agent.lab.network import HOST_INDEX, PREFIX_LENGTH, Network, ip_program
from agent.lab.processes import LabError, alive, signal_all, wait_gone

INNER_LINK = "eth0"
NETNS_DIR = "/run/netns"
COMMAND_TIMEOUT = 10.0
HOW_TO_RUN = "run `dragent lab up --netns` as root on a machine with iproute2 (`ip netns`)"


def unavailable() -> str | None:
    """Why a ``netns`` lab cannot run here (not root, no ``ip netns``), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not Path(ip_program()).exists():
        return "iproute2's `ip` is not installed"
    if not Path("/proc/self/ns/net").exists():
        return "this kernel has no network namespaces"
    return None


async def run(argv: list[str]) -> str:
    """Run one command; its stdout. Raises ``LabError`` with its output if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise LabError(f"`{' '.join(argv)}` did not finish within {COMMAND_TIMEOUT:g}s") from None
    if proc.returncode:
        raise LabError(f"`{' '.join(argv)}` failed: {err.decode(errors='replace').strip()}")
    return out.decode()


async def ip(*args: str) -> str:
    return await run([ip_program(), *args])


async def namespaces() -> set[str]:
    """Every network namespace ``ip netns`` knows, by name."""
    listing = await ip("netns", "list")
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def exists(ns: str) -> bool:
    """True if the named network namespace exists (``ip netns`` keeps them here)."""
    return Path(NETNS_DIR, ns).exists()


def link_exists(name: str) -> bool:
    """True if the host namespace has a network interface ``name``."""
    return Path("/sys/class/net", name).exists()


async def ensure(net: Network, fresh: bool = False) -> None:
    """Create what is missing of ``net``'s namespaces, links and tables (see the
    module docstring). Raises ``LabError`` if this machine cannot, or a command fails."""
    if (why := unavailable()) is not None:
        raise LabError(f"the netns lab cannot run here: {why}", hint=HOW_TO_RUN)
    if fresh:
        await remove(net)
    await _ensure_bridge(net)
    existing = await namespaces()
    for member in HOST_INDEX:
        await _ensure_member(net, member, existing)


async def _ensure_bridge(net: Network) -> None:
    if not link_exists(net.bridge):
        await ip("link", "add", net.bridge, "type", "bridge")
    await ip("addr", "replace", f"{net.bridge_address}/{PREFIX_LENGTH}", "dev", net.bridge)
    await ip("link", "set", net.bridge, "up")


async def _ensure_member(net: Network, member: str, existing: set[str]) -> None:
    ns, host_end = net.namespace(member), net.host_link(member)
    if ns not in existing:
        await ip("netns", "add", ns)
    inner = await run([ip_program(), "-n", ns, "-o", "link", "show"])
    if f" {INNER_LINK}@" not in inner:
        if link_exists(host_end):  # a veth whose peer is gone: replace it
            await ip("link", "del", host_end)
        await ip("link", "add", host_end, "type", "veth", "peer", "name", INNER_LINK, "netns", ns)
    await ip("link", "set", host_end, "master", net.bridge, "up")
    address = f"{net.address(member)}/{PREFIX_LENGTH}"
    await ip("-n", ns, "addr", "replace", address, "dev", INNER_LINK)
    await ip("-n", ns, "link", "set", "lo", "up")
    await ip("-n", ns, "link", "set", INNER_LINK, "up")


async def remove(net: Network) -> None:
    """Kill what runs in ``net``'s namespaces and delete them, their links and the
    bridge. Idempotent; what is already gone is skipped."""
    existing = await namespaces()
    for member in HOST_INDEX:
        ns = net.namespace(member)
        if ns in existing:
            await _kill_inside(ns)
        # The host end first: deleting a namespace frees its veth asynchronously.
        await _delete_link(net.host_link(member))
        if ns in existing:
            await ip("netns", "del", ns)
    await _delete_link(net.bridge)


async def _delete_link(name: str) -> None:
    """Delete a host interface unless it is gone (or goes while we ask)."""
    if link_exists(name):
        try:
            await ip("link", "del", name)
        except LabError:
            if link_exists(name):
                raise


async def _kill_inside(ns: str) -> None:
    """SIGKILL every process in ``ns``: a namespace lives on while a process holds it."""
    pids = [int(p) for p in (await ip("netns", "pids", ns)).split() if p.isdigit()]
    signal_all(pids, signal.SIGKILL)
    try:
        async with asyncio.timeout(10.0):
            await wait_gone(pids)
    except TimeoutError:
        left = [p for p in pids if alive(p)]
        raise LabError(f"processes {left} in namespace {ns} survived SIGKILL for 10s") from None
