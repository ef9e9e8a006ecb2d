"""Verifications on demand, run by the agent: submit, run as owned tasks, keep signed reports.

``VerifyJobs.submit(stream)`` queues a verification of one configured stream
and returns its ``Job`` at once; ``serve()`` (run for the agent's lifetime)
runs queued jobs inside its own ``TaskGroup``, at most ``parallel`` at a time,
each calling the stream kind's optional ``verify()`` and signing the report
with the region's key (``report_signing_key``). Finished jobs are
kept in memory, the newest ``keep`` of them; the last result per stream is
exported as the ``dragent_verification_*`` gauges (deploy/prometheus/README.md).

A job never raises out of ``serve()``: a verification that cannot run
(unreachable vault, missing key) ends as a ``failed`` job with the error.
Cancelling ``serve()`` cancels the running jobs.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from replicators import logs, registry
from verifiers.report import load_or_create_signing_key, sign

if TYPE_CHECKING:
    from agent.config import AgentConfig, StreamConfig

VerifyFn = Callable[..., Awaitable[dict[str, Any]]]
State = Literal["queued", "running", "done", "failed"]
MAX_QUEUED = 16


class VerifyUnavailable(Exception):
    """The stream cannot be verified on demand (unknown stream, or its kind has no verify)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    id: str
    stream: str
    kind: str
    deep: bool
    created_at: float
    state: State = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    report: dict[str, Any] | None = None
    error: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def summary(self) -> dict[str, Any]:
        """Everything but the report itself: what a listing or a poll shows."""
        report = self.report or {}
        return {
            "id": self.id,
            "stream": self.stream,
            "kind": self.kind,
            "deep": self.deep,
            "state": self.state,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "ok": report.get("ok") if self.report is not None else None,
            "summary": report.get("summary") if self.report is not None else self.error,
            "differences": len(report.get("differences") or []) if self.report else None,
            "error": self.error,
        }


def verify_function(stream: StreamConfig) -> VerifyFn | None:
    """The kind's ``verify`` or None if the kind has none."""
    return getattr(registry.module(stream.kind), "verify", None)


class VerifyJobs:
    def __init__(
        self,
        config: Callable[[], AgentConfig],
        *,
        keep: int = 100,
        parallel: int = 1,
    ) -> None:
        self._config = config
        self._keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._slots = asyncio.Semaphore(parallel)
        self._log = logs.get("verify")
        self.collector = VerificationCollector(self)

    def config(self) -> AgentConfig:
        """The agent's configuration as of now (it changes on reload)."""
        return self._config()

    # -- requests -----------------------------------------------------------------
    def submit(self, stream_name: str, *, deep: bool = False) -> Job:
        """Queue a verification of ``stream_name``. Raises ``VerifyUnavailable`` (404 unknown
        stream, 501 kind without verify, 429 when ``MAX_QUEUED`` jobs already wait)."""
        cfg = self._config()
        try:
            stream = cfg.stream(stream_name)
        except KeyError:
            raise VerifyUnavailable(f"no stream named {stream_name!r}", 404) from None
        if verify_function(stream) is None:
            raise VerifyUnavailable(f"kind {stream.kind!r} has no on-demand verification", 501)
        if self._queue.qsize() >= MAX_QUEUED:
            raise VerifyUnavailable(f"{MAX_QUEUED} verifications already queued", 429)
        job = Job(secrets.token_hex(8), stream.name, stream.kind, deep, time.time())
        self._jobs[job.id] = job
        self._trim()
        self._queue.put_nowait(job)
        self._log.info("verification queued", id=job.id, stream=stream.name, deep=deep)
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        """Every kept job, newest first."""
        return list(reversed(self._jobs.values()))

    def latest(self) -> dict[str, Job]:
        """Per stream, the newest finished job."""
        out: dict[str, Job] = {}
        for job in self._jobs.values():
            if job.state in ("done", "failed"):
                out[job.stream] = job
        return out

    def _trim(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in ("done", "failed")]
        for job in finished[: max(0, len(self._jobs) - self._keep)]:
            del self._jobs[job.id]

    # -- running ------------------------------------------------------------------
    async def serve(self) -> None:
        """Run queued jobs until cancelled; each job is a task of this TaskGroup."""
        async with asyncio.TaskGroup() as tg:
            while True:
                job = await self._queue.get()
                await self._slots.acquire()
                tg.create_task(self._run(job), name=f"verify-{job.id}")

    async def _run(self, job: Job) -> None:
        try:
            job.state, job.started_at = "running", time.time()
            cfg = self._config()
            stream = cfg.stream(job.stream)
            fn = verify_function(stream)
            if fn is None:  # a reload changed the stream's kind since submit
                raise VerifyUnavailable(f"kind {stream.kind!r} has no verification", 501)
            report = await fn(stream, cfg, deep=job.deep, repair=False)
            key = await asyncio.to_thread(load_or_create_signing_key, cfg.signing_key_path)
            job.report = sign({**report, "job": job.id}, key)
            job.state = "done"
            self._log.info("verification done", id=job.id, stream=job.stream, ok=report.get("ok"))
        except Exception as exc:
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
            self._log.error("verification failed", id=job.id, stream=job.stream, error=job.error)
        finally:
            job.finished_at = time.time()
            self._slots.release()
            job.done.set()


class VerificationCollector(Collector):
    """The last verification per stream, as the gauges the alert rules read."""

    def __init__(self, jobs: VerifyJobs) -> None:
        self._jobs = jobs

    def collect(self) -> Iterator[Metric]:
        ok = GaugeMetricFamily(
            "dragent_verification_ok",
            "1 if the last verification of the stream found the copies equal, else 0.",
            labels=["stream"],
        )
        diffs = GaugeMetricFamily(
            "dragent_verification_differences",
            "Differences the last verification found.",
            labels=["stream"],
        )
        last = GaugeMetricFamily(
            "dragent_verification_last_run_timestamp_seconds",
            "When the last verification of the stream finished (unix).",
            labels=["stream"],
        )
        success = GaugeMetricFamily(
            "dragent_verification_last_success_timestamp_seconds",
            "When the last verification that found no difference finished (unix).",
            labels=["stream"],
        )
        good: dict[str, float] = {}
        for job in self._jobs.jobs():
            if job.report is not None and job.report.get("ok") and job.finished_at:
                good.setdefault(job.stream, job.finished_at)
        for stream, job in sorted(self._jobs.latest().items()):
            last.add_metric([stream], job.finished_at or 0.0)
            if job.report is not None:
                ok.add_metric([stream], 1.0 if job.report.get("ok") else 0.0)
                diffs.add_metric([stream], float(len(job.report.get("differences") or [])))
            if stream in good:
                success.add_metric([stream], good[stream])
        yield from (ok, diffs, last, success)
