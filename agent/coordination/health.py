"""Health: this region's own checks, the heartbeat, and probes of other regions.

- ``Heartbeat``: while active, one row per region in ``dragent_heartbeat`` is
  updated every ``heartbeat_interval`` (a real write through the WAL). On a
  standby the same row, replayed, tells how far behind the primary it is: the
  lag used by the ``max_lag`` gate and the RPO of a failover come from it.
- ``probe(url)``: one check of a target — ``postgresql://`` (a query),
  ``http(s)://`` (any answer below 500), ``tcp://host:port`` (a connection).
- ``PeerWatch``: per region, since when every one of its probes fails.

Probes never raise: they return a ``Check``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg

HEARTBEAT_DDL = """
CREATE TABLE IF NOT EXISTS dragent_heartbeat (
    region text PRIMARY KEY, epoch bigint NOT NULL, at timestamptz NOT NULL
)"""
HEARTBEAT_UPSERT = """
INSERT INTO dragent_heartbeat (region, epoch, at) VALUES ($1, $2, clock_timestamp())
ON CONFLICT (region) DO UPDATE SET epoch = excluded.epoch, at = excluded.at
RETURNING extract(epoch FROM at)::float8"""
HEARTBEAT_LAST = """
SELECT extract(epoch FROM max(at))::float8 FROM dragent_heartbeat WHERE region = $1"""


@dataclass(frozen=True)
class Check:
    target: str
    ok: bool
    seconds: float
    error: str = ""
    heartbeat: float | None = None  # a postgresql target's last heartbeat (its clock)

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        out["target"] = redact(self.target)
        return out


def redact(url: str) -> str:
    """The URL without credentials (probe targets may carry a password)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


async def probe(url: str, within: float, heartbeat_of: str | None = None) -> Check:
    """Check ``url`` once within ``within`` seconds. Never raises."""
    started = time.monotonic()
    beat: float | None = None
    try:
        async with asyncio.timeout(within):
            scheme = urlsplit(url).scheme
            if scheme.startswith("postgres"):
                beat = await _probe_postgres(url, heartbeat_of)
            elif scheme in ("http", "https"):
                await _probe_http(url)
            else:
                await _probe_tcp(url)
    except Exception as exc:  # a probe reports every failure
        error = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        return Check(url, False, time.monotonic() - started, error[:200])
    return Check(url, True, time.monotonic() - started, heartbeat=beat)


async def _probe_postgres(url: str, heartbeat_of: str | None) -> float | None:
    conn = await asyncpg.connect(url)
    try:
        if heartbeat_of is None:
            await conn.fetchval("SELECT 1")
            return None
        try:
            return await conn.fetchval(HEARTBEAT_LAST, heartbeat_of)
        except asyncpg.UndefinedTableError:
            return None
    finally:
        conn.terminate()


async def _probe_http(url: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        if response.status >= 500:
            raise RuntimeError(f"HTTP {response.status}")


async def _probe_tcp(url: str) -> None:
    parts = urlsplit(url)
    _, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.close()


class PeerWatch:
    """Since when each region's probes have all failed (monotonic time)."""

    def __init__(self, targets: Mapping[str, Sequence[str]], within: float) -> None:
        self.targets = {region: list(urls) for region, urls in targets.items()}
        self.within = within
        self.down_since: dict[str, float | None] = dict.fromkeys(self.targets)
        self.last: dict[str, list[Check]] = {}
        self.last_heartbeat: dict[str, float] = {}

    async def probe_all(self, now: float) -> None:
        """Probe every region once, concurrently; update ``down_since``."""
        regions = list(self.targets)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self._probe_region(r)) for r in regions]
        for region, task in zip(regions, tasks, strict=True):
            checks = task.result()
            self.last[region] = checks
            if any(c.ok for c in checks) or not checks:
                self.down_since[region] = None
            elif self.down_since[region] is None:
                self.down_since[region] = now
            beats = [c.heartbeat for c in checks if c.heartbeat is not None]
            if beats:
                self.last_heartbeat[region] = max(beats)

    async def _probe_region(self, region: str) -> list[Check]:
        urls = self.targets[region]
        return list(await asyncio.gather(*(probe(u, self.within, region) for u in urls)))

    def view(self) -> dict[str, Any]:
        return {
            region: {
                "down": self.down_since.get(region) is not None,
                "checks": [c.public() for c in self.last.get(region, [])],
            }
            for region in self.targets
        }


class Heartbeat:
    """The heartbeat row of one region in its own database. One connection,
    used by one operation at a time (the heartbeat loop and the decision loop
    both use it); each operation has a deadline of ``within`` seconds."""

    def __init__(self, dsn: str, region: str, within: float = 1.0) -> None:
        self.dsn = dsn
        self.region = region
        self.within = within
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn)
        return self._conn

    async def beat(self, epoch: int) -> float:
        """Write the heartbeat; return its commit time (the database's clock).
        Raises asyncpg/OS errors or TimeoutError (a fenced database refuses)."""
        async with self._lock, asyncio.timeout(self.within):
            conn = await self._connection()
            try:
                await conn.execute(HEARTBEAT_DDL)
                return float(await conn.fetchval(HEARTBEAT_UPSERT, self.region, epoch))
            except BaseException:
                await self.aclose()
                raise

    async def last(self, region: str) -> float | None:
        """The last heartbeat of ``region`` this database has (replayed or written)."""
        async with self._lock, asyncio.timeout(self.within):
            conn = await self._connection()
            try:
                return await conn.fetchval(HEARTBEAT_LAST, region)
            except asyncpg.UndefinedTableError:
                return None
            except BaseException:
                await self.aclose()
                raise

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
