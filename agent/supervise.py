"""The one loop that runs every stream: recover, step, classify the error, back off.

A runner exposes ``recover()`` and an idempotent ``sync_once(stop)``; this
module owns waiting, retrying and logging, so runners stay free of them.

- Transient errors (store unavailable, source down, anything unexpected)
  restart the runner after a capped, jittered backoff; ``recover()`` runs
  again, so a half-done step is redone from the last durable point. The
  backoff (and the error log's rate limit) resets only once a step went
  through after a recovery: a runner that recovers and then fails every
  step (a wrong secret) backs off exponentially and logs once per interval.
- ``IntegrityError`` is never retried: the stream halts, says why in its
  progress (``/status``, ``/readyz``) and waits for the stop.
- When ``stop`` is set the current step finishes (a shipper seals, publishes
  and acknowledges what it holds) and the loop returns.
- The progress is ``live`` only while the task is "running": a starting,
  retrying, halted or stopped stream takes no RPO proof, so its RPO grows
  with wall time (``replicators.progress``).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.backoff import Backoff
from replicators import logs
from replicators.errors import DragentError, IntegrityError
from replicators.metrics import Metrics
from replicators.progress import StreamProgress


class Runner(Protocol):
    async def recover(self) -> None: ...

    async def sync_once(self, stop: asyncio.Event) -> Any: ...


@dataclass
class StreamTask:
    name: str
    runner: Runner
    progress: StreamProgress
    idle: float = 0.0
    """Seconds to wait after a step that found nothing to do (a sink's poll interval)."""
    idle_max: float = 0.0
    """With ``idle_max`` > ``idle``: each step that finds nothing doubles the wait, up to
    ``idle_max``; one that did several things at once (a sink that found several new
    segments) halves it, down to ``idle``; one that did one thing keeps it. A sink so
    lists its vault about as often as segments arrive, at most every ``idle_max``."""
    state: str = "starting"
    last_error: str | None = None
    idle_at: float = 0.0
    """Wall-clock time at which the last step that found nothing to do began (a sink's
    vault listing that began then was empty; see agent.catchup)."""
    backoff: Backoff = field(default_factory=Backoff)
    nudge: asyncio.Event = field(default_factory=asyncio.Event)
    """Set to end an idle wait at once (a takeover's last drain of the sinks)."""


def _enter(task: StreamTask, state: str, error: str | None = None) -> None:
    """Set the task's state and whether its progress may take RPO proofs."""
    task.state, task.last_error = state, error
    task.progress.live = state == "running"


async def _wait(stop: asyncio.Event, delay: float) -> None:
    try:
        async with asyncio.timeout(delay):
            await stop.wait()
    except TimeoutError:
        pass


async def _idle(stop: asyncio.Event, nudge: asyncio.Event, delay: float) -> None:
    """Wait ``delay``, or less if ``stop`` or ``nudge`` is set (``nudge`` is then cleared)."""
    if nudge.is_set():
        nudge.clear()
        return
    waits = [asyncio.ensure_future(e.wait()) for e in (stop, nudge)]
    try:
        await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    nudge.clear()


async def run_stream(task: StreamTask, stop: asyncio.Event, metrics: Metrics) -> None:
    """Run ``task`` until ``stop`` (see the module docstring); however it ends, even
    cancelled, its progress is no longer live."""
    _enter(task, "starting")
    try:
        await _supervise(task, stop, metrics)
    finally:
        if task.state in ("starting", "running"):
            _enter(task, "stopped", task.last_error)
        task.progress.live = False


async def _supervise(task: StreamTask, stop: asyncio.Event, metrics: Metrics) -> None:
    log = logs.get("stream", stream=task.name)
    limiter = logs.RateLimited(30.0)
    while not stop.is_set():
        try:
            await task.runner.recover()
            _enter(task, "running")
            stepped = False
            wait = task.idle
            while not stop.is_set():
                began = time.time()
                did = await task.runner.sync_once(stop)
                if not stepped:  # a recovery counts once a step went through after it
                    stepped = True
                    if limiter.forget("error"):
                        log.info("stream recovered", after_attempts=task.backoff.attempt)
                    task.backoff.reset()
                    log.info("stream running")
                if did:
                    # several new at once: falling behind, list sooner; one: the pace fits
                    if int(did) > 1:
                        wait = max(task.idle, wait / 2)
                else:
                    task.idle_at = began
                    if wait:
                        await _idle(stop, task.nudge, wait)
                        wait = min(max(task.idle_max, task.idle), wait * 2)
            _enter(task, "stopped")
            return
        except IntegrityError as exc:
            _enter(task, "halted", str(exc))
            task.progress.halted = str(exc)
            log.error("stream halted on integrity error", error=str(exc))
            await stop.wait()
            return
        except Exception as exc:
            _enter(task, "retrying", f"{type(exc).__name__}: {exc}")
            metrics.restarts.labels(task.name, type(exc).__name__).inc()
            delay = task.backoff.next_delay(random.random())
            held = limiter.allow("error")
            if held is not None:
                log.warning(
                    "stream step failed",
                    error=task.last_error,
                    retry_in=round(delay, 3),
                    suppressed=held,
                    exc_info=not isinstance(exc, DragentError | OSError),
                )
            await _wait(stop, delay)
    _enter(task, "stopped", task.last_error)
