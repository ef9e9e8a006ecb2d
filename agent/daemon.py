"""``dragent run``: the long-running agent of one region.

Shape: the HTTP endpoint for the whole life of the process; inside it, a
*generation* of stream tasks built from one configuration. SIGHUP builds a
new configuration first and, if it is valid, drains the old generation and
starts the next; if it is not, the old one keeps running and the problems are
logged. SIGTERM/SIGINT drain: every stream finishes its current unit (a
shipper seals, publishes and acknowledges what it holds) within
``drain_timeout``; a second signal, or the timeout, cancels. The exit code is
non-zero if the drain did not finish.
"""

from __future__ import annotations

import asyncio
import signal
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from agent.catchup import drain_sinks
from agent.collector import ProgressCollector
from agent.compliance.monitor import ComplianceMonitor
from agent.config import AgentConfig, ConfigError, as_member, load_config
from agent.coordination.coordinator import Coordinator
from agent.costlog import FILE as COST_FILE
from agent.costlog import CostLog
from agent.group.member import GroupMember
from agent.group.metrics import GroupCollector
from agent.group.runner import PartitionRunner
from agent.http import HttpServer, StatusSource, build_app
from agent.loopwatch import LoopWatch
from agent.scrub import STATS as SCRUB_STATS
from agent.streams import EPOCH, Owned, build_tasks, stream_partitions
from agent.supervise import StreamTask, run_stream
from agent.systemd import Notifier
from agent.verifyjobs import VerifyJobs
from replicators import logs
from replicators.metrics import Metrics
from replicators.postgres.pgmetrics import COLLECTOR as PG_COLLECTOR
from replicators.store_metrics import StoreMetrics


class Agent(StatusSource):
    def __init__(
        self,
        cfg: AgentConfig,
        config_path: Path | None = None,
        instance: str | None = None,
        listen: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.instance = instance
        self.listen = listen
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.loop_watch = LoopWatch()
        self.store_metrics = StoreMetrics(self.registry)
        self.cost = CostLog(  # <data_dir>/cost.jsonl: what `dragent report cost` reads
            cfg.data_dir / COST_FILE, self.store_metrics, self.metrics, cfg.region,
            lambda: {s.name: s.kind for s in self.cfg.streams},
        )  # fmt: skip
        self.tasks: list[StreamTask] = []
        self.started_at = time.time()
        self.generation = 0
        self._events: asyncio.Queue[str] = asyncio.Queue()
        self._force = asyncio.Event()
        self._signals = 0
        self.notifier = Notifier()
        self.log = logs.get("agent", region=cfg.region)
        # its own thread and loop: nothing blocking the streams delays a lease renewal
        self.coordinator = (
            Coordinator(cfg, catch_up=self._catch_up, applied=self._sinks, threaded=True)
            if cfg.failover.enabled
            else None
        )
        if self.coordinator is not None:
            self.registry.register(self.coordinator.collector())
        # an agent of a group runs the partitions it owns (agent.group)
        self.group = (
            GroupMember(
                cfg.etcd,
                cfg.region,
                cfg.instance or "",
                cfg.group.member_ttl,
                [p.name for p in stream_partitions(cfg)],
                active=cfg.role == "active",
                base_epoch=EPOCH,
            )
            if cfg.group.enabled
            else None
        )
        if self.group is not None:
            self.registry.register(GroupCollector(self.group))
        self.registry.register(
            ProgressCollector(
                cfg.region,
                lambda: self.tasks,
                lambda: self._mode(),
                lambda: self._epoch(),
                lambda: self.cfg.policy,
            )
        )
        self.registry.register(PG_COLLECTOR)  # the postgres kind's slot/replay/sync gauges
        self.registry.register(SCRUB_STATS)  # the vault scrub's progress (agent.scrub)
        self.verify_jobs = VerifyJobs(lambda: self.cfg)
        self.compliance = ComplianceMonitor(
            cfg, live_rpo=self._live_rpo, verifications=self.verify_jobs.jobs
        )
        self.registry.register(self.compliance.collector)

    def _live_rpo(self) -> dict[str, float]:
        now, out = time.time(), {}
        for t in self.tasks:
            if t.progress.side == "source":
                out[t.progress.stream] = max(out.get(t.progress.stream, 0.0), t.progress.rpo(now))
        return out

    # -- StatusSource -----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.time()
        return {
            "region": self.cfg.region,
            "role": self._mode(),
            "epoch": self.coordinator.shown_epoch if self.coordinator else EPOCH,
            "failover": self.coordinator.status() if self.coordinator else None,
            "group": self.group.status() if self.group else None,
            "generation": self.generation,
            "uptime_seconds": round(now - self.started_at, 3),
            "loop": {
                "stalls": self.loop_watch.stalls,
                "longest_blocked_seconds": round(self.loop_watch.longest, 1),
            },
            "streams": [
                {
                    "task": t.name,
                    "state": t.state,
                    "last_error": t.last_error,
                    "rpo_target_seconds": self.cfg.policy.rpo_target(t.progress.stream),
                    **t.progress.snapshot(now),
                }
                for t in self.tasks
            ],
            "compliance": self.compliance.status(),
            "cost": self.cost.status(now),
        }

    def healthy(self) -> tuple[bool, str]:
        return True, "event loop responsive"

    def ready(self) -> tuple[bool, str]:
        if self._mode() == "fenced":
            return False, "fenced: no stream runs until this region holds the lease again"
        group = self.group
        if group is not None and not self.tasks:
            if group.fenced or group.lease_id is None:
                return False, "not a member of the group (etcd unreachable or lease lost)"
            return True, "member of the group, owns no partition now"
        if not self.tasks and self.cfg.streams:
            return False, "streams not started"
        waiting = [t.name for t in self.tasks if t.state != "running"]
        if waiting:
            return False, "streams not running: " + ", ".join(waiting)
        return True, "all streams running"

    # -- signals ----------------------------------------------------------------------
    def request_stop(self) -> None:
        self._signals += 1
        if self._signals > 1:
            self.log.warning("second stop signal: aborting the drain")
            self._force.set()
        self._events.put_nowait("stop")

    async def _catch_up(self) -> str | None:
        """The coordinator's hook (called from its own thread): apply what is left in the
        vault, in this daemon's loop; the LSN the standby must replay (agent.catchup)."""
        future = asyncio.run_coroutine_threadsafe(drain_sinks(lambda: self.tasks), self._loop)
        try:
            return await asyncio.wrap_future(future)
        finally:
            future.cancel()

    def _sinks(self) -> list[Any]:
        """The sinks' progress (watermarks), for the coordinator's standing (its thread)."""
        return [t.progress for t in list(self.tasks) if t.progress.side == "sink"]

    def _token(self) -> str | None:
        """The API token of the configuration in force (SIGHUP reloads it)."""
        return self.cfg.http.token.reveal() if self.cfg.http.token else None

    def _effective(self) -> AgentConfig:
        """The configuration with the role the coordinator decided, if there is one."""
        return self.coordinator.effective(self.cfg) if self.coordinator else self.cfg

    def _epoch(self) -> int:
        return self.coordinator.epoch if self.coordinator else EPOCH

    def _mode(self) -> str:
        """active, passive, or fenced (holds or held the lease but must not write)."""
        return self.coordinator.mode if self.coordinator else self.cfg.role

    async def _follow_role(self, coordinator: Coordinator) -> None:
        """Each change of mode (active, fenced, passive) or epoch rebuilds the streams,
        like a reload; becoming fenced cancels them at once (nothing more is shipped)."""
        while True:
            mode, epoch = await coordinator.role_changed()
            self.log.info("role from the coordinator", mode=mode, epoch=epoch)
            self._events.put_nowait("fence" if mode == "fenced" else "role")

    async def _start_group(self, tg: asyncio.TaskGroup, stop: asyncio.Event) -> None:
        """Join the group and wait (up to a membership TTL) for its first partitions."""
        group = self.group
        if group is None:
            return
        tg.create_task(group.run(stop))
        try:
            async with asyncio.timeout(group.ttl):
                await group.changed()
        except TimeoutError:
            self.log.warning("no partition owned yet")

    async def _start_coordinator(
        self, tg: asyncio.TaskGroup, stop: asyncio.Event
    ) -> asyncio.Task[None] | None:
        """Start the coordinator, wait (up to a lease TTL) for its first decision;
        return the task that follows its role changes (to cancel at the end)."""
        if self.coordinator is None:
            return None
        tg.create_task(self.coordinator.run(stop))
        try:
            async with asyncio.timeout(self.cfg.failover.lease_ttl):
                await self.coordinator.wait_decided()
        except TimeoutError:
            self.log.warning("no failover decision yet: starting passive")
        return tg.create_task(self._follow_role(self.coordinator))

    def request_reload(self) -> None:
        self._events.put_nowait("reload")

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    # -- main -------------------------------------------------------------------------
    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._install_signals()
        self.loop_watch.start()
        app = build_app(self, self.registry, self._token, self.verify_jobs)
        server = HttpServer(self.cfg.http, app)
        await server.start()
        self.log.info("http listening", listen=self.cfg.http.listen)
        try:
            async with asyncio.TaskGroup() as tg:
                watchdog = tg.create_task(self._watchdog())
                compliance = tg.create_task(self.compliance.run(asyncio.Event()))
                cost = tg.create_task(self.cost.run())
                coordination = asyncio.Event()
                follower = await self._start_coordinator(tg, coordination)
                await self._start_group(tg, coordination)
                code = await self._generations()
                coordination.set()
                if follower is not None:
                    follower.cancel()
                watchdog.cancel()
                compliance.cancel()
                cost.cancel()
        finally:
            self.notifier.stopping()
            await server.aclose()
            self.loop_watch.stop()
        self.log.info("agent stopped", exit_code=code)
        return code

    async def _generations(self) -> int:
        while True:
            self.generation += 1
            stop = asyncio.Event()
            gen = asyncio.create_task(self._generation(self._effective(), stop))
            event = await self._next_event(gen)
            stop.set()
            if event == "fence":
                self.log.warning("fenced: cancelling every stream, nothing more is shipped")
                gen.cancel()
            drained = await self._drain(gen)
            if event == "stop" or event == "failed":
                return 0 if drained and event == "stop" else 1
            self.log.info("configuration reloaded", generation=self.generation + 1)

    async def _next_event(self, gen: asyncio.Task[None]) -> str:
        """Wait for a stop, a valid reload, or the generation failing to start."""
        while True:
            getter = asyncio.ensure_future(self._events.get())
            done, _ = await asyncio.wait({getter, gen}, return_when=asyncio.FIRST_COMPLETED)
            if gen in done:
                getter.cancel()
                return "failed"
            event = getter.result()
            if event == "stop":
                return "stop"
            if event == "role":
                return "reload"
            if event == "fence":
                return "fence"
            self.notifier.reloading()
            if self._reload():
                return "reload"
            self.notifier.ready(self._summary())

    def _reload(self) -> bool:
        if self.config_path is None:
            return False
        try:
            new = as_member(load_config(self.config_path), self.instance, self.listen)
        except ConfigError as exc:
            self.log.error("reload refused: invalid configuration", problems=exc.problems)
            return False
        if new.region != self.cfg.region:
            self.log.error("reload refused: region changed", old=self.cfg.region, new=new.region)
            return False
        logs.configure(new.log.format, new.log.level)
        if self.group is not None:
            self.group.parts = [p.name for p in stream_partitions(new)]
        self.cfg = new
        self.compliance.update_config(new)
        return True

    async def _drain(self, gen: asyncio.Task[None]) -> bool:
        self.notifier.status("draining")
        self.log.info("draining streams", timeout=self.cfg.drain_timeout)
        force = asyncio.ensure_future(self._force.wait())
        done, _ = await asyncio.wait(
            {gen, force}, timeout=self.cfg.drain_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        force.cancel()
        if gen not in done:
            self.log.error("drain incomplete: cancelling streams")
            gen.cancel()
        try:
            await gen
        except asyncio.CancelledError:
            return False
        except Exception as exc:
            self.log.error("generation failed", error=f"{type(exc).__name__}: {exc}")
            return False
        self.log.info("streams drained")
        return True

    async def _group_generation(
        self, cfg: AgentConfig, group: GroupMember, stop: asyncio.Event
    ) -> None:
        """An agent of a group: start and stop partitions as ownership moves, leaving the
        others running (``agent.group.runner``); a member that could not renew its
        membership in time cancels them all at once."""

        async def build(owned: dict[str, int], stack: AsyncExitStack) -> list[StreamTask]:
            epoch = self._epoch()
            mine = Owned(epoch, owned)
            return await build_tasks(cfg, self.metrics, stack, self.store_metrics, epoch, mine)

        async def run(task: StreamTask, until: asyncio.Event) -> None:
            await run_stream(task, until, self.metrics)

        # a partition being handed over has no owner until its stop ends: at most
        # drain + 2 * settle = ttl / 4 + ttl / 6 (1.5 + 1 s at a TTL of 6 s), well under a TTL
        runner = PartitionRunner(
            build,
            run,
            drain=min(cfg.drain_timeout, group.ttl / 4),
            settle=max(0.5, group.ttl / 12),
        )
        try:
            while not stop.is_set():
                await runner.apply(dict(group.owned), at_once=group.fenced)
                self.tasks = runner.tasks
                await group.released(set(runner.running))  # another member may take them
                self.notifier.ready(self._summary())
                self.log.info("partitions running", owned=sorted(runner.running))
                changed = asyncio.ensure_future(group.changed())
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait({changed, stopping}, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                stopping.cancel()
        finally:
            await runner.apply({}, at_once=not stop.is_set())
            await group.released(())

    async def _generation(self, cfg: AgentConfig, stop: asyncio.Event) -> None:
        if self.group is not None:
            await self._group_generation(cfg, self.group, stop)
            return
        fenced = self._mode() == "fenced"
        async with AsyncExitStack() as stack:
            if fenced:
                # a fenced region runs no source, shipper, sink or job; the last streams stay
                # listed (state "fenced", no proof taken) so their RPO keeps growing
                for task in self.tasks:
                    task.state = "fenced"
            else:
                self.tasks = await build_tasks(
                    cfg, self.metrics, stack, self.store_metrics, epoch=self._epoch()
                )
            self.notifier.ready(self._summary())
            self.log.info("streams starting", role=cfg.role, streams=[t.name for t in self.tasks])
            async with asyncio.TaskGroup() as tg:
                for task in () if fenced else self.tasks:
                    tg.create_task(run_stream(task, stop, self.metrics), name=task.name)
                if fenced or not self.tasks:
                    tg.create_task(stop.wait())  # nothing runs: the generation lasts anyway

    def _summary(self) -> str:
        return f"{self.cfg.region} {self.cfg.role}: {len(self.cfg.streams)} streams"

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)


async def run_agent(
    config_path: Path, instance: str | None = None, listen: str | None = None
) -> int:
    cfg = as_member(load_config(config_path), instance, listen)
    logs.configure(cfg.log.format, cfg.log.level)
    return await Agent(cfg, config_path, instance, listen).run()
