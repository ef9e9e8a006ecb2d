"""The chaos run's clients: writes to PostgreSQL, each recorded when it returned.

Three clients write rows of one table with ids unique across them:

- ``dns``: the application. Before each write it asks the lab's DNS server
  where the name the failover switches points, and writes there;
- ``direct-a``, ``direct-b``: a client with a stale DNS cache, always writing
  to one region's database (region b's is its standby until a promotion).

Each write is one statement that also reads, in the same transaction, the
highest epoch in ``dragent_heartbeat`` (the coordinator writes it under the
epoch it holds): the history then says which region's database acknowledged
the write and under which epoch. A write is recorded ``ok`` only when its
COMMIT returned; a timeout is recorded as failed (it may or may not have
committed: the checker counts only acknowledged writes as lost).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import asyncpg
import dns.exception

from agent.chaos.history import History
from agent.lab.agent_drill import AgentDrill
from agent.lab.bind import resolve

TABLE = "chaos_writes"
DDL = f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigint PRIMARY KEY, client text NOT NULL)"
WRITE = f"""
INSERT INTO {TABLE} (id, client) VALUES ($1, $2)
RETURNING (SELECT coalesce(max(epoch), 0) FROM dragent_heartbeat)"""
DEADLINE = 1.0

Route = Callable[[], Awaitable[str | None]]
"""Where the next write goes: a region name, or None (nowhere known)."""


@dataclass
class Client:
    name: str
    route: Route
    dsns: dict[str, str]
    ids: Iterator[int]
    history: History
    every: float = 0.05
    acked: int = 0
    _conn: asyncpg.Connection | None = field(default=None, repr=False)
    _region: str | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Write until ``stop``; every attempt is recorded."""
        try:
            while not stop.is_set():
                region = await self.route()
                if region is not None:
                    await self._write(region)
                await asyncio.sleep(self.every)
        finally:
            self._drop()

    async def _write(self, region: str) -> None:
        ident, invoked = next(self.ids), time.time()
        event = {"type": "write", "client": self.name, "id": ident, "invoked": invoked}
        try:
            async with asyncio.timeout(DEADLINE):
                conn = await self._connection(region)
                epoch = await conn.fetchval(WRITE, ident, self.name)
        except Exception as exc:  # every failure is a recorded, failed write
            self._drop()
            self.history.write(
                event | {"ok": False, "region": region, "epoch": None, "error": _error(exc)}
            )
            return
        self.acked += 1
        self.history.write(event | {"ok": True, "region": region, "epoch": int(epoch)})

    async def _connection(self, region: str) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed() or self._region != region:
            self._drop()
            self._conn = await asyncpg.connect(self.dsns[region])
            self._region = region
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


def _error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]


def dsns(drill: AgentDrill) -> dict[str, str]:
    return {"a": drill.a_dsn, "b": drill.b_dsn}


def dns_route(drill: AgentDrill) -> Route:
    """Where the lab's DNS server says the name points (None: no answer)."""
    server = drill.dns
    assert server is not None
    by_address = {address: region for region, address in server.addresses.items()}

    async def route() -> str | None:
        try:
            answer = await resolve(server.port, address=server.address)
        except (OSError, dns.exception.DNSException):
            return None
        return by_address.get(answer[0]) if answer else None

    return route


def fixed_route(region: str) -> Route:
    async def route() -> str | None:
        return region

    return route


def clients(drill: AgentDrill, history: History) -> list[Client]:
    """The three clients of a run, sharing one id sequence."""
    ids = itertools.count(1)
    targets = dsns(drill)
    return [
        Client("dns", dns_route(drill), targets, ids, history),
        Client("direct-a", fixed_route("a"), targets, ids, history, every=0.1),
        Client("direct-b", fixed_route("b"), targets, ids, history, every=0.1),
    ]


async def setup(drill: AgentDrill, sync: bool = False) -> None:
    """The table, created on region a's primary (it reaches b's standby by replication);
    with ``sync``, a's commits wait for the standby (``synchronous_standby_names``)."""
    conn = await asyncpg.connect(drill.a_dsn)
    try:
        await conn.execute(DDL)
        if sync:
            await conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def present(dsn: str) -> list[int]:
    """Every id in the table of the database at ``dsn``."""
    conn = await asyncpg.connect(dsn)
    try:
        return sorted(r[0] for r in await conn.fetch(f"SELECT id FROM {TABLE}"))
    finally:
        await conn.close()
