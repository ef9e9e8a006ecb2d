"""The coordinator's probes (a mixin of ``Coordinator``): the other regions and this one,
the health published in etcd, the heartbeat, the lag behind the leader and the
readiness checks shown in ``/status``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg

from agent.coordination.health import probe
from agent.coordination.lease import EtcdUnavailable
from agent.coordination.successor import Standing
from replicators.postgres.lsn import parse_lsn
from replicators.postgres.readiness import database_role


class Probing:
    """Methods of ``Coordinator``: they read and set its state."""

    def _own_targets(self) -> list[str]:
        vault = self.cfg.vault.endpoint
        return ([vault] if vault else []) + list(self.f.own_probes)

    async def _probe(self) -> None:
        """Probe the other regions and this one; publish this region's health."""
        within = self.f.probe_timeout
        own, _ = await asyncio.gather(
            asyncio.gather(*(probe(u, within) for u in self._own_targets())),
            self.peers.probe_all(time.monotonic()),
        )
        self.own_checks = [c.public() for c in own]
        await self._initial_fence_state()  # what the database says, not what was assumed
        self.standing = await self._own_standing()
        health = {
            "at": time.time(),
            "role": self.role,
            "epoch": self.epoch,
            "fenced": self.fenced,
            "heartbeat": self.last_heartbeat,
            "checks": self.own_checks,
            "peers": self.peers.view(),
            "standing": self.standing.public(),
        }
        with contextlib.suppress(EtcdUnavailable):
            await self.lease.put_json(f"health/{self.region}", health)

    async def _own_standing(self) -> Standing:
        """How caught up this region is (``agent.coordination.successor``): the applied
        end of its ``postgres`` stream, else its standby's replay LSN; the latest applied
        source time of its other streams."""
        position: int | None = None
        latest: float | None = None
        for progress in self.applied() if self.applied is not None else ():
            mark = progress.marks.get("applied")
            if mark is None:
                continue
            if progress.kind == "postgres":
                position = max(position or 0, int(mark.position))
            elif mark.source_time is not None:
                latest = max(latest or 0.0, float(mark.source_time))
        if position is None and self.f.dsn:
            position = await self._replayed_position()
        return Standing(self.region, self.role, position, latest, time.time())

    async def _replayed_position(self) -> int | None:
        """The standby's replay LSN (a primary's current LSN), or None if unreadable."""
        query = (
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
            " ELSE pg_current_wal_lsn() END::text"
        )
        try:
            async with asyncio.timeout(self.f.probe_timeout):
                conn = await asyncpg.connect(self.f.dsn)
                try:
                    lsn = await conn.fetchval(query)
                finally:
                    conn.terminate()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return None
        return parse_lsn(lsn) if lsn else None

    async def _beat(self) -> None:
        if self.heartbeat is None or not self.writable:
            return
        try:
            self.last_heartbeat = await self.heartbeat.beat(self.epoch)
        except Exception as exc:  # reported; the heartbeat loop goes on
            self._warn("heartbeat failed", f"{type(exc).__name__}: {exc}")

    async def _lag(self, leader: str | None) -> float | None:
        """How much of the leader's WAL this region lacks, in seconds of heartbeats:
        the leader's last heartbeat seen by the probes minus the last one replayed here.
        A region without a database (``postgres_dsn`` unset) has no lag to gate on: 0."""
        if self.heartbeat is None:
            return 0.0
        if not leader or leader == self.region:
            return None
        primary = self.peers.last_heartbeat.get(leader)
        try:
            local = await self.heartbeat.last(leader)
        except Exception:  # lag unknown: the max_lag gate then refuses
            return None
        if primary is None or local is None:
            return None
        return max(0.0, primary - local)

    async def _check_readiness(self) -> None:
        """Can this region take over now? Separate from health: nothing here
        triggers a failover. Checks: etcd answers, the standby replays (or this
        is the primary), lag within ``max_lag``, each switch's credentials."""
        out: dict[str, dict[str, Any]] = {}
        view = self.view
        answered = view is not None and self.decision is not None
        out["etcd"] = _result(
            answered,
            f"leader {view.leader or 'none'}, epoch {view.epoch}"
            if answered and view is not None
            else "etcd has not answered yet",
        )
        if self.f.dsn:
            out["database"] = _result(*await database_role(self.f.dsn))
            lag_ok = self.role == "active" or (self.lag is not None and self.lag <= self.f.max_lag)
            out["lag"] = _result(lag_ok, f"lag {self.lag}s, max {self.f.max_lag:g}s")
        for switch in self.switches:
            check = getattr(switch, "check_credentials", None)
            if check is None:
                continue
            try:
                await check()
                out[switch.describe()] = _result(True, "credentials accepted")
            except Exception as exc:  # a readiness check reports every failure
                out[switch.describe()] = _result(False, f"{type(exc).__name__}: {exc}")
        self.readiness = out


def _result(ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": ok, "detail": detail}
