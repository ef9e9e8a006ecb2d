"""Cutting the links between lab regions.

The lab's servers all listen on 127.0.0.1 in the host's network namespace,
and this machine has neither nftables nor iptables (and ``tc netem`` does not
work), so a link is cut in two ways that need no privileges and no change to
the servers:

- ``Link``: a TCP forwarder in front of one server, used as the address by
  which *another* region reaches it (a passive region's probes of the active
  region's PostgreSQL, for example). ``cut()`` drops every open connection
  and stops listening (new connections are refused); ``await heal()``
  listens and forwards again on the same port. The region's own clients use the server
  directly, so cutting the link leaves the region alive on its side.
- etcd membership: a region cut off from the others *and* from the witness
  is, for etcd, a member that answers nobody — ``isolate_etcd(lab, region)``
  suspends its member (SIGSTOP), so the region's agent, which talks only to
  its own member, can neither read nor renew; ``heal_etcd`` resumes it.

Moving each region into its own ``ip netns`` with veth pairs would make the
cuts real packet drops; that needs the lab's servers to start inside the
namespaces and is left for when the lab can do that.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


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
