"""The keeper: fences this region's PostgreSQL when the agent stops petting it.

A paused or hung agent cannot fence its own database: a lease holder can be
suspended (a long pause, SIGSTOP, a stuck loop) past its TTL and wake up still
believing it leads, while its database kept taking writes and another region
promoted. The keeper is a separate small process (``dragent keeper``: its own
systemd unit or sidecar container) that the agent's coordinator pets once per
decision cycle, over a Unix socket, with one JSON line::

    {"armed": true, "fence_in": 3.2, "epoch": 7, "region": "a"}

``armed``: this region holds the lease unfenced and takes writes; ``fence_in``:
seconds until the agent itself would fence for lack of renewals
(``fence_after`` less the age of its last successful renewal). The keeper
fences the database on its own clock (``fencing.fence``: read-only and ending
sessions, or the stop command) when ``fence_in`` elapses before the next armed
pet, and retries until it succeeds. A disarmed pet (passive, or fenced
already) stops the timer. The keeper never unfences: only a lease holder does.
A frozen agent's database is therefore fenced by the deadline the agent itself
would have kept, inside the fencing budget (``failover_config.FencingBudget``).

``Watch`` is the pure timer; ``run_keeper`` the process; ``KeeperClient`` the
agent's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from agent.coordination import fencing
from agent.failover_config import FailoverConfig
from replicators import logs


@dataclass
class Watch:
    """The keeper's timer, on the keeper's monotonic clock (``now`` passed in)."""

    deadline: float | None = None
    epoch: int = 0
    fenced_at: float | None = None

    def pet(self, now: float, armed: bool, fence_in: float, epoch: int) -> None:
        """Arm the timer for ``fence_in`` seconds from ``now``, or disarm it."""
        self.epoch = epoch
        if armed:
            self.deadline = now + max(0.0, fence_in)
            self.fenced_at = None
        else:
            self.deadline = None

    def due(self, now: float) -> bool:
        """True while an armed deadline has passed and the fence is not done."""
        return self.deadline is not None and now >= self.deadline and self.fenced_at is None

    def fenced(self, now: float) -> None:
        self.fenced_at = now


def parse_pet(line: bytes) -> tuple[bool, float, int]:
    """``(armed, fence_in, epoch)`` from one pet line; raises ``ValueError``."""
    value = json.loads(line)
    if not isinstance(value, dict) or not isinstance(value.get("armed"), bool):
        raise ValueError("a pet is a JSON object with a boolean 'armed'")
    fence_in = float(value.get("fence_in", 0.0))
    if not fence_in >= 0.0:
        raise ValueError("fence_in must be a number >= 0")
    return value["armed"], fence_in, int(value.get("epoch", 0))


class Keeper:
    """The keeper process's state and loops (see the module docstring)."""

    TICK = 0.05

    def __init__(self, failover: FailoverConfig, socket_path: Path, region: str) -> None:
        self.f = failover
        self.path = socket_path
        self.watch = Watch()
        self.log = logs.get("keeper", region=region)
        self._warnings = logs.RateLimited(10.0)

    async def run(self, stop: asyncio.Event) -> None:
        """Listen for pets and fence when due, until ``stop``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = await asyncio.start_unix_server(self._client, path=str(self.path))
        os.chmod(self.path, 0o600)
        self.log.info("keeper listening", socket=str(self.path))
        try:
            while not stop.is_set():
                if self.watch.due(asyncio.get_running_loop().time()):
                    await self._fence()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.TICK):
                        await stop.wait()
        finally:
            server.close()
            await server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    armed, fence_in, epoch = parse_pet(line)
                except ValueError as exc:
                    self._warn("bad pet ignored", str(exc))
                    continue
                self.watch.pet(asyncio.get_running_loop().time(), armed, fence_in, epoch)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _fence(self) -> None:
        self.log.warning("agent silent past its deadline: fencing", epoch=self.watch.epoch)
        try:
            async with asyncio.timeout(self.f.fence_timeout):
                account = await fencing.fence(self.f.dsn, self.f.fencing, self.f.stop_command)
        except (TimeoutError, fencing.FencingError, OSError) as exc:
            self._warn("keeper fence failed, retrying", f"{type(exc).__name__}: {exc}")
            return
        self.watch.fenced(asyncio.get_running_loop().time())
        self.log.warning("fenced by the keeper", result=account, epoch=self.watch.epoch)

    def _warn(self, message: str, error: str) -> None:
        if self._warnings.allow(message) is not None:
            self.log.warning(message, error=error)


class KeeperClient:
    """The agent's side: one connection, re-opened after a failure. ``ok`` says
    whether the last pet was delivered."""

    def __init__(self, path: Path, region: str) -> None:
        self.path = path
        self.region = region
        self.ok: bool | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def pet(self, armed: bool, fence_in: float, epoch: int) -> None:
        """Send one pet; raises ``OSError`` when the keeper cannot be reached."""
        line = {"armed": armed, "fence_in": round(fence_in, 3), "epoch": epoch}
        data = (json.dumps(line | {"region": self.region}) + "\n").encode()
        try:
            if self._writer is None or self._writer.is_closing():
                _, self._writer = await asyncio.open_unix_connection(str(self.path))
            self._writer.write(data)
            await self._writer.drain()
            self.ok = True
        except OSError:
            self.ok = False
            await self.aclose()
            raise

    async def aclose(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
