"""The namespaces, veth pairs and bridge of a lab in ``netns`` mode.

``ensure(net)`` makes, for every member of ``net`` (``agent.lab.network``):
the namespace ``drgN-<member>`` with ``lo`` up; a veth pair whose namespace
end ``eth0`` holds the member's address and whose host end ``drgN-<member>``
is on the bridge ``drgN-br`` (the host's address ``10.77.N.254``); and the
member's nftables table (``agent.lab.partitions``). It is idempotent: what
exists is kept (a running lab keeps its servers and its partitions). With
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

from agent.lab import partitions
from agent.lab.network import HOST_INDEX, PREFIX_LENGTH, Network, ip_program
from agent.lab.processes import LabError, alive, signal_all, wait_gone

INNER_LINK = "eth0"
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


def link_exists(name: str) -> bool:
    """True if the host namespace has a network interface ``name``."""
    return Path("/sys/class/net", name).exists()


async def ensure(net: Network, fresh: bool = False) -> None:
    """Create what is missing of ``net``'s namespaces, links and tables (see the
    module docstring). Raises ``LabError`` if this machine cannot, or a command fails."""
    if (why := unavailable()) is not None:
        raise LabError(f"the netns lab cannot run here: {why}", hint=HOW_TO_RUN)
    partitions.check_available()
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
    partitions.ensure_table(ns)


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


# -- the fakes the netns lab replaces; removed once the failover tests use partitions --
import contextlib  # noqa: E402
from typing import Any  # noqa: E402


class Link:
    """A cuttable TCP path to ``127.0.0.1:target``, listening on ``listen``
    (0: any free port, see ``port``). ``async with Link(...)`` starts and closes it."""

    def __init__(self, target: int, listen: int = 0) -> None:
        self.target = target
        self.listen = listen
        self.port = 0
        self.is_cut = False
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Link:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port or self.listen, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, template: str) -> str:
        """``template`` with ``{port}`` replaced by this link's port."""
        return template.replace("{port}", str(self.port))

    def cut(self) -> None:
        """Drop every connection through the link and stop listening. Idempotent."""
        self.is_cut = True
        if self._server is not None:
            self._server.close()
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()

    async def heal(self) -> None:
        """Listen and forward again, on the same port. Idempotent."""
        if self.is_cut:
            self.is_cut = False
            await self.start()

    async def aclose(self) -> None:
        self.cut()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._pipes.update((writer, up_writer))
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._pipes.discard(w)
                w.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()


def isolate_etcd(lab: Any, region: str) -> None:
    """Cut ``region``'s etcd member off from everyone (suspend it)."""
    lab.server(region, "etcd").pause()


def heal_etcd(lab: Any, region: str) -> None:
    lab.server(region, "etcd").resume()
