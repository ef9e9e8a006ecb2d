"""The coordinator: one region's failover loop, owned by the daemon's TaskGroup.

``Coordinator.run(stop)`` runs three loops until ``stop`` is set: the decision
cycle every ``renew_interval`` (renew or read the lease, ``decide``, act),
probes of the other regions every ``probe_interval`` (and this region's
health published in etcd), and the heartbeat write while this region holds
the lease unfenced. ``step()`` is one decision cycle, public for tests.

The daemon reads ``role`` and ``epoch`` (the fencing token of every segment
it writes) and waits on ``role_changed()`` to drain and rebuild its streams
when they change. ``status()`` is the coordinator's part of ``/status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import asyncpg

from agent.config import AgentConfig
from agent.coordination import events, fencing
from agent.coordination.decide import Action, Decision, Observation, Role, Rules, decide
from agent.coordination.health import Heartbeat, PeerWatch
from agent.coordination.keeper import KeeperClient
from agent.coordination.lease import ClusterView, EtcdLease, EtcdUnavailable
from agent.coordination.probing import Probing
from agent.coordination.successor import Standing, ahead, from_health
from agent.coordination.takeover import LeaseLost
from agent.coordination.taking_over import TakingOver
from agent.coordination.thread_host import ThreadHost
from agent.switch import build_switch
from replicators import logs

Mode = Literal["active", "fenced", "passive"]
PAGE_EVERY = 300.0
READINESS_EVERY = 15.0


class Coordinator(ThreadHost, TakingOver, Probing):
    def __init__(
        self,
        cfg: AgentConfig,
        *,
        catch_up: Callable[[], Awaitable[str | None]] | None = None,
        applied: Callable[[], Any] | None = None,
        threaded: bool = False,
    ) -> None:
        self.cfg = cfg
        self.f = cfg.failover
        self.region = cfg.region
        self.lease = EtcdLease(cfg.etcd, cfg.region, self.f.lease_ttl)
        self.peers = PeerWatch(self.f.peer_probes, self.f.probe_timeout)
        dsn = self.f.dsn
        self.heartbeat = Heartbeat(dsn, cfg.region, self.f.probe_timeout) if dsn else None
        self.switches = [build_switch(s) for s in self.f.switches]
        path = self.f.keeper_socket
        self.keeper = KeeperClient(path, cfg.region) if path else None
        self.catch_up = catch_up
        # the daemon's sink watermarks (``Probing._own_standing``), read from this thread
        self.applied = applied
        self.standing: Standing | None = None
        self.peer_standings: dict[str, Standing] = {}
        self.ahead: tuple[str, ...] = ()
        self.rules = Rules(
            automatic=self.f.automatic,
            fence_after=self.f.fence_after,
            takeover_after=self.f.takeover_after,
            lockout=self.f.lockout,
            max_lag=self.f.max_lag,
        )
        self.role: Role = "passive"
        self.epoch = 0
        self._fenced = False
        self._own_fence = False  # the fence in force is one this process set
        self._in_recovery = False  # the database is a standby (not yet promoted)
        self.holding = False
        self.renewed_at: float | None = None
        self.lease_lost = False  # etcd said the held lease no longer exists
        self.view: ClusterView | None = None
        self.decision: Decision | None = None
        self.last_record: dict[str, Any] | None = None
        self.last_heartbeat: float | None = None
        self.lag: float | None = None
        self.readiness: dict[str, dict[str, Any]] = {}
        self.own_checks: list[dict[str, Any]] = []
        self.threaded = threaded
        self._caller: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()
        self._decided = asyncio.Event()
        self._reported: tuple[Mode, int] = ("passive", 0)
        self._pages = logs.RateLimited(PAGE_EVERY)
        self._warnings = logs.RateLimited(30.0)
        self.log = logs.get("failover", region=cfg.region)
        # what each action of ``decide`` does
        self._actions: dict[str, Callable[[Action], Awaitable[None]]] = {
            "renew": self._do_renew,
            "fence": self._do_fence,
            "unfence": self._do_unfence,
            "release": self._do_release,
            "adopt": self._do_adopt,
            "acquire": self._do_acquire,
            "takeover": self._do_takeover,
            "page": self._do_page,
        }

    # -- daemon interface -------------------------------------------------------------
    async def role_changed(self) -> tuple[Mode, int]:
        """Wait until mode (active, fenced or passive) or epoch differ from what was
        last reported (by this or by ``wait_decided``); return the new ones."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            now = (self.mode, self.epoch)
            if now != self._reported:
                self._reported = now
                return now

    async def wait_decided(self) -> None:
        """Wait until the first decision cycle ran (the role is known); the caller
        bounds it with ``asyncio.timeout`` and starts passive if it expires. The
        role at that moment counts as reported to ``role_changed``."""
        await self._decided.wait()
        self._reported = (self.mode, self.epoch)

    def effective(self, cfg: AgentConfig) -> AgentConfig:
        """``cfg`` with the role this coordinator decided (the file's role only
        says which region bootstraps the lease)."""
        return cfg.model_copy(update={"role": self.role})

    @property
    def writable(self) -> bool:
        return self.role == "active" and not self.fenced

    @property
    def fenced(self) -> bool:
        return self._fenced

    @fenced.setter
    def fenced(self, value: bool) -> None:
        """Set when this region's database is (or is no longer) fenced; a holder's
        change of it is a change of mode that the daemon follows."""
        self._set_fence(value, self._own_fence)

    def _set_fence(self, fenced: bool, own: bool) -> None:
        """The database is fenced (or not), by this process (``own``) or someone else;
        signals the daemon when that changes the mode."""
        before = self.mode
        self._fenced, self._own_fence = fenced, own and fenced
        if self.mode != before:
            self._signal(self._changed)

    @property
    def shown_epoch(self) -> int:
        """The epoch this region holds, or, passive, the one it follows (etcd's)."""
        if self.role == "active" or self.view is None:
            return self.epoch
        return self.view.epoch

    @property
    def mode(self) -> Mode:
        """``active`` (holds the lease, writes), ``fenced`` (holds or held it but fenced
        itself, unsure of the lease, or its database is still a standby that a switchover
        is promoting: it ships nothing) or ``passive``. A holder fenced by someone else
        (a switchover fences the old primary, then waits until the standby has
        everything it wrote) stays ``active``: it must ship its last WAL."""
        if self.role == "active":
            unsure = self._fenced and self._own_fence
            return "fenced" if unsure or self._in_recovery else "active"
        return "passive"

    def status(self) -> dict[str, Any]:
        view = self.view
        return {
            "region": self.region,
            "role": self.role,
            "mode": self.mode,
            "epoch": self.shown_epoch,
            "fenced": self.fenced,
            "holding_lease": self.holding,
            "leader": view.leader if view else None,
            "paused": view.paused if view else None,
            "decision": self.decision.summary if self.decision else None,
            "peers": self.peers.view(),
            "last_heartbeat": self.last_heartbeat,
            "own_checks": self.own_checks,
            "lag_seconds": self.lag,
            "standing": self.standing.public() if self.standing else None,
            "ahead": list(self.ahead),
            "keeper": None if self.keeper is None else {"reached": self.keeper.ok},
            "readiness": self.readiness,
            "last_failover": self.last_record,
        }

    async def _run(self, stop: asyncio.Event) -> None:
        await self._initial_fence_state()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._every(self.f.probe_interval, self._probe, stop))
                tg.create_task(self._every(self.f.heartbeat_interval, self._beat, stop))
                tg.create_task(self._every(READINESS_EVERY, self._check_readiness, stop))
                await self._every(self.f.renew_interval, self.step, stop)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the database and etcd connections (the lease is left to expire)."""
        if self.heartbeat:
            await self.heartbeat.aclose()
        if self.keeper:
            await self.keeper.aclose()
        await self.lease.aclose()

    async def _initial_fence_state(self) -> None:
        """Read whether this region's database is fenced (read-only mode): at start and
        with every probe, so a fence left behind by someone else (a refused switchover,
        an operator) is seen, shown and decided on (a holder unfences, a follower fences)."""
        if self.f.dsn and self.f.fencing == "read-only":
            with contextlib.suppress(
                fencing.FencingError, OSError, asyncpg.PostgresError, TimeoutError
            ):
                async with asyncio.timeout(self.f.probe_timeout):
                    fenced, in_recovery = await fencing.fence_state(self.f.dsn)
                before = self.mode
                self._in_recovery = in_recovery
                if self.mode != before:
                    self._signal(self._changed)
                self.fenced = fenced  # a fence found gone is no longer anyone's

    # -- one cycle --------------------------------------------------------------------
    async def observe(self) -> Observation:
        """Renew the held lease (recording when the renewal was sent), then read
        the coordination keys. etcd failures become ``etcd_ok=False``."""
        etcd_ok = True
        try:
            # each call has dial_timeout; a failed renewal skips the read, so a cycle
            # that cannot renew decides within one dial_timeout (the fencing budget)
            if self.holding:
                await self._renew()
            self.view = await self.lease.view()
        except EtcdUnavailable as exc:
            etcd_ok = False
            self._warn("etcd unavailable", str(exc))
        view = self.view or ClusterView(None, 0, 0, 0, None, False, None)
        self.lag = await self._lag(view.last_leader)
        self.ahead = await self._ahead(view) if etcd_ok else ()
        return Observation(
            region=self.region,
            now=time.monotonic(),
            wall=time.time(),
            etcd_ok=etcd_ok,
            leader=view.leader,
            epoch=view.epoch,
            last_leader=view.last_leader,
            holding=self.holding,
            renewed_at=self.renewed_at,
            fenced=self.fenced,
            bootstrap_active=self.cfg.role == "active",
            paused=view.paused,
            last_failover=view.last_failover,
            peer_down_since=self.peers.down_since.get(view.last_leader or ""),
            lag=self.lag,
            fence_external=self.fenced and not self._own_fence,
            ahead=self.ahead,
        )

    async def _ahead(self, view: ClusterView) -> tuple[str, ...]:
        """While a takeover is possible (no leader, the last one another region): the
        live passive regions more caught up than this one, from the standings they
        published in etcd (``agent.coordination.successor``). Unreadable: none."""
        if view.leader is not None or view.epoch == 0 or view.last_leader == self.region:
            return ()
        others = [p.name for p in self.cfg.peers if p.name != view.last_leader]
        if not others:
            return ()
        standings: dict[str, Standing] = {}
        for region in others:
            try:
                found = from_health(region, await self.lease.get_json(f"health/{region}"))
            except EtcdUnavailable:
                continue
            if found is not None:
                standings[region] = found
        self.peer_standings = standings
        me = self.standing or Standing(self.region)
        grace = self.f.successor_grace
        return ahead(me, standings.values(), time.time(), grace, view.last_leader)

    async def _renew(self) -> bool:
        """Renew the held lease, recording when a successful renewal was *sent*; False
        (and ``lease_lost``) when etcd says the lease is gone. Raises EtcdUnavailable."""
        sent = time.monotonic()
        if await self.lease.renew():
            self.renewed_at = sent
            return True
        self.lease_lost = True
        return False

    async def hold(self, step: str) -> None:
        """Before an irreversible step of a takeover (promote, unfence): try a fresh
        renewal, then require that a renewal sent within ``fence_after`` succeeded and
        that etcd never said the lease is gone. Raises ``LeaseLost``."""
        try:
            async with asyncio.timeout(self.cfg.etcd.dial_timeout):
                await self._renew()
        except (EtcdUnavailable, TimeoutError) as exc:
            self._warn("renewal before a takeover step failed", str(exc) or "deadline exceeded")
        if self.lease_lost:
            raise LeaseLost(f"before {step}: etcd says the lease no longer exists")
        age = time.monotonic() - self.renewed_at if self.renewed_at is not None else None
        if age is None or age >= self.f.fence_after:
            since = "ever" if age is None else f"for {age:.1f}s"
            raise LeaseLost(
                f"before {step}: no lease renewal {since} (fence_after {self.f.fence_after:g}s)"
            )

    async def step(self) -> Decision:
        """One cycle: observe, decide, act. Never raises for an outage."""
        decision = decide(await self.observe(), self.rules)
        if self.decision is None or decision.summary != self.decision.summary:
            self.log.info("failover cycle", decision=decision.summary, role=decision.role)
        self.decision = decision
        for action in decision.actions:
            await self._act(action)
        await self._pet()
        self._signal(self._decided)
        return decision

    async def _pet(self) -> None:
        """Tell the keeper whether to guard this region, and by when it must fence if no
        pet follows: when this agent itself would fence for lack of renewals."""
        if self.keeper is None:
            return
        armed = self.writable and self.holding and self.renewed_at is not None
        left = self.f.fence_after - (time.monotonic() - self.renewed_at) if armed else 0.0
        try:
            async with asyncio.timeout(self.f.probe_timeout):
                await self.keeper.pet(armed, max(0.0, left), self.epoch)
        except (OSError, TimeoutError) as exc:
            self._warn("keeper unreachable", f"{type(exc).__name__}: {exc}")

    async def _act(self, action: Action) -> None:
        """Run one action; a failure is logged and the next cycle decides again
        (a fence that failed is decided again, the region is not marked fenced).
        Fencing has a deadline of ``fence_timeout`` (part of the fencing budget)."""
        handler = self._actions[action.kind]
        try:
            if action.kind in ("fence", "unfence"):
                async with asyncio.timeout(self.f.fence_timeout):
                    await handler(action)
            else:
                await handler(action)
        except (
            EtcdUnavailable,
            fencing.FencingError,
            OSError,
            TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
        ) as exc:
            self._warn(f"{action.kind} failed", f"{type(exc).__name__}: {exc}")

    async def _do_renew(self, action: Action) -> None:
        """Renewal happens in ``observe``; nothing more to do."""

    async def _do_fence(self, action: Action) -> None:
        if self._warnings.allow(f"fencing: {action.reason}") is not None:
            self.log.warning("fencing this region", reason=action.reason, mode=self.f.fencing)
        account = await fencing.fence(self.f.dsn, self.f.fencing, self.f.stop_command)
        self._set_fence(True, own=True)
        self.log.warning("fenced", result=account)

    async def _do_unfence(self, action: Action) -> None:
        if self.f.dsn and self.f.fencing == "read-only":
            await fencing.unfence(self.f.dsn)
        self._set_fence(False, own=False)
        self.log.info("unfenced", reason=action.reason)

    async def _do_release(self, action: Action) -> None:
        self.holding = False
        self.renewed_at = None
        await self.lease.release()
        self._set_role("passive", self.view.epoch if self.view else self.epoch)

    async def _do_adopt(self, action: Action) -> None:
        """Renew the lease an earlier process of this region held. If that process took
        it over (``via`` takeover) and died before promoting — this region's database
        is still a standby — finish that takeover now, lease checks and all."""
        view = self.view
        if view is None or not view.leader_lease:
            return
        self.lease.adopt(view.leader_lease)
        self.holding, self.lease_lost = True, False
        self.renewed_at = None
        if view.leader_via == "takeover" and await self._standby():
            others = [r for r in self.f.peer_probes if r != self.region]
            old = others[0] if others else "?"
            why = "finishing the takeover an earlier process of this region began"
            self.log.warning("taking over", epoch=view.leader_epoch, old=old, reason=why)
            await self._take_over(view.leader_epoch, old, why, time.time())
            return
        self._set_role("active", view.leader_epoch)

    async def _standby(self) -> bool:
        """True if this region's database is in recovery (False without one)."""
        dsn = self.f.dsn
        if not dsn:
            return False
        conn = await asyncpg.connect(dsn, timeout=self.f.probe_timeout)
        try:
            return bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
        finally:
            await conn.close()

    async def _do_acquire(self, action: Action) -> None:
        sent = time.monotonic()
        epoch = await self.lease.acquire(action.expect_epoch)
        if epoch is None:
            return
        self.holding, self.renewed_at, self.lease_lost = True, sent, False
        self.log.info("lease acquired", epoch=epoch, reason=action.reason)
        self._set_role("active", epoch)

    async def _do_page(self, action: Action) -> None:
        if self._pages.allow(action.reason) is None:
            return
        self.log.error("human needed", reason=action.reason)
        record = {"kind": "page", "region": self.region, "reason": action.reason, "epoch": 0}
        await events.notify(self.f.notify, record)

    def collector(self) -> Any:
        """A Prometheus collector of this coordinator's state (scrape-time)."""
        from agent.coordination.metrics import FailoverCollector

        return FailoverCollector(self)

    # -- helpers ---------------------------------------------------------------------------
    def _set_role(self, role: Role, epoch: int) -> None:
        if (role, epoch) != (self.role, self.epoch):
            self.log.info("role changed", role=role, epoch=epoch, was=self.role)
            self.role, self.epoch = role, epoch
            self._signal(self._changed)

    def _warn(self, message: str, error: str) -> None:
        if self._warnings.allow(message) is not None:
            self.log.warning(message, error=error)
