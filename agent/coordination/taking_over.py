"""The coordinator's takeover (a mixin of ``Coordinator``): acquire the expired lease,
run every step (``takeover.Takeover``) with a keepalive beside it, then serve and
record; abort, fenced, if the lease was lost on the way."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg

from agent.coordination import events, fencing
from agent.coordination.decide import Action
from agent.coordination.lease import EtcdUnavailable
from agent.coordination.takeover import LeaseLost, Takeover


class TakingOver:
    """Methods of ``Coordinator``: they read and set its state."""

    async def _do_takeover(self, action: Action) -> None:
        seen = self._failure_seen()
        sent = time.monotonic()
        epoch = await self.lease.acquire(action.expect_epoch)
        if epoch is None:
            self.log.info("takeover lost the race: another region acquired the lease")
            return
        self.holding, self.renewed_at, self.lease_lost = True, sent, False
        old = (self.view.last_leader if self.view else None) or "?"
        self.log.warning("taking over", epoch=epoch, old=old, reason=action.reason)
        await self._take_over(epoch, old, action.reason, seen)

    async def _take_over(self, epoch: int, old: str, reason: str, seen: float) -> None:
        """Every step after the lease is held (``Takeover.run``), the keepalive beside it;
        then serve and record, or abort if the lease was lost on the way."""
        run = Takeover(
            region=self.region,
            old_region=old,
            epoch=epoch,
            reason=reason,
            dsn=self.f.dsn,
            switches=self.switches,
            old_dsns=[u for u in self.f.peer_probes.get(old, []) if "postgres" in u],
            catch_up=self.catch_up,
            catchup_timeout=self.f.catchup_timeout,
            catchup_settle=self.f.catchup_settle,
            hold=self.hold,
        )
        run.timeline["failure_seen"] = seen
        run.mark("acquired")
        aborted: str | None = None
        primary_last: float | None = None
        stop_keepalive = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._every(self.f.renew_interval, self._keepalive, stop_keepalive))
            try:
                try:
                    await run.run()
                    if self.heartbeat and old != "?":
                        run.notes["local_last_heartbeat"] = await self.heartbeat.last(old)
                except LeaseLost as exc:
                    aborted = str(exc)
                except Exception as exc:  # the lease is ours: record, page, keep it
                    run.errors.append(f"takeover: {type(exc).__name__}: {exc}")
                    self.log.error("takeover step failed", error=run.errors[-1])
                if aborted is None:
                    primary_last = self.peers.last_heartbeat.get(old)
                    await self._serving(epoch, run)
            finally:
                stop_keepalive.set()
        if aborted is not None:
            await self._abort(run, aborted)
            return
        self._in_recovery = False  # promoted by this takeover
        self._set_fence(False, own=False)
        self._set_role("active", epoch)
        await self._record(run, primary_last)

    async def _abort(self, run: Takeover, why: str) -> None:
        """The lease was lost mid-takeover: fence this region, let the lease go, stay
        passive, and record why. Whatever was promoted stays read-only."""
        self.log.error("takeover aborted: the lease was lost", reason=why)
        run.errors.append(f"aborted: {why}")
        try:
            async with asyncio.timeout(self.f.fence_timeout):
                run.notes["fenced"] = await fencing.fence(
                    self.f.dsn, self.f.fencing, self.f.stop_command
                )
            self._set_fence(True, own=True)
        except (TimeoutError, fencing.FencingError, OSError, asyncpg.PostgresError) as exc:
            run.errors.append(f"fencing after the abort: {type(exc).__name__}: {exc}")
        self.holding, self.renewed_at = False, None
        await self.lease.release()
        run.mark("aborted")
        self._set_role("passive", run.epoch)
        await self.publish(run.record("failover", aborted=why, rpo_seconds=None))

    async def _keepalive(self) -> None:
        try:
            async with asyncio.timeout(self.cfg.etcd.dial_timeout):
                await self._renew()
        except (EtcdUnavailable, TimeoutError) as exc:
            self._warn("lease renewal during the takeover failed", str(exc) or "deadline")

    async def _serving(self, epoch: int, run: Takeover) -> None:
        if self.heartbeat is None:
            run.mark("serving")
            return
        for _ in range(100):
            try:
                self.last_heartbeat = await self.heartbeat.beat(epoch)
                run.mark("serving")
                return
            except Exception as exc:  # retried until the deadline, then recorded
                error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.1)
        run.errors.append(f"not serving: {error}")

    def _failure_seen(self) -> float:
        view = self.view
        since = self.peers.down_since.get(view.last_leader or "") if view else None
        if since is None:
            return time.time()
        return time.time() - (time.monotonic() - since)

    async def _record(self, run: Takeover, primary_last: float | None) -> None:
        replayed = run.notes.get("local_last_heartbeat")
        rpo = None
        if primary_last is not None and replayed is not None:
            rpo = round(max(0.0, primary_last - replayed), 3)
        record = run.record("failover", rpo_seconds=rpo, primary_last_heartbeat=primary_last)
        await self.publish(record)

    async def publish(self, record: dict[str, Any]) -> None:
        """Record a takeover: data directory, etcd (best effort), evidence log, webhooks."""
        self.last_record = record
        events.write_local(self.cfg.data_dir, record)
        with contextlib.suppress(EtcdUnavailable):
            await self.lease.put_json(f"failovers/{record['epoch']:010d}", record)
            if record["kind"] == "failover":
                at = {"at": record["timeline"]["acquired"], "epoch": record["epoch"]}
                await self.lease.put_json("last_failover", at | {"region": record["region"]})
        self.log.warning(
            f"{record['kind']} done", **{k: record[k] for k in ("epoch", "rto_seconds")}
        )
        await events.to_evidence(self.cfg, record)
        await events.notify(self.f.notify, record)
