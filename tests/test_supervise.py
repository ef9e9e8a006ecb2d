"""The one loop that runs every stream: how it backs off and what it logs."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from agent.backoff import Backoff
from agent.supervise import StreamTask, run_stream
from replicators.errors import AccessDenied
from replicators.metrics import Metrics
from replicators.progress import StreamProgress


class RefusedEveryStep:
    """A runner that recovers fine and is refused at every step (a wrong S3 secret:
    the listing at recovery is allowed, the PUT is not)."""

    def __init__(self) -> None:
        self.recovered = 0
        self.steps = 0

    async def recover(self) -> None:
        self.recovered += 1

    async def sync_once(self, stop: asyncio.Event) -> bool:
        self.steps += 1
        raise AccessDenied("s3 SignatureDoesNotMatch")


async def test_a_step_that_always_fails_backs_off_exponentially_and_logs_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    runner = RefusedEveryStep()
    task = StreamTask(
        "refused",
        runner,
        StreamProgress("refused", "synthetic", "source", "b"),
        backoff=Backoff(base=0.05, cap=1.0),
    )
    stop = asyncio.Event()
    job = asyncio.create_task(run_stream(task, stop, Metrics(CollectorRegistry())))
    await asyncio.sleep(3.0)
    stop.set()
    async with asyncio.timeout(5):
        await job
    # base 0.05 doubling to a 1 s cap (full jitter): a handful of tries in 3 s, not 60
    assert 3 <= runner.steps <= 15, runner.steps
    assert task.backoff.attempt >= 3
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert err.count("stream step failed") == 1  # rate-limited: once per 30 s
    assert "stream recovered" not in err


class Quiet:
    """A sink over a quiet vault: every listing finds nothing, until ``news`` is set."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.news = 0

    async def recover(self) -> None:
        return None

    async def sync_once(self, stop: asyncio.Event) -> int:
        self.steps.append(asyncio.get_running_loop().time())
        found, self.news = self.news, 0
        return found


async def test_a_quiet_sink_polls_less_often_and_a_nudge_or_news_brings_it_back() -> None:
    runner = Quiet()
    progress = StreamProgress("quiet", "synthetic", "sink", "vault")
    task = StreamTask("quiet", runner, progress, idle=0.1, idle_max=0.8)
    stop = asyncio.Event()
    job = asyncio.create_task(run_stream(task, stop, Metrics(CollectorRegistry())))
    await asyncio.sleep(3.0)
    # 0.1, 0.2, 0.4, 0.8, 0.8, ...: a handful of listings in 3 s, not 30
    assert 4 <= len(runner.steps) <= 9, len(runner.steps)
    gaps = [b - a for a, b in zip(runner.steps, runner.steps[1:], strict=False)]
    assert max(gaps) < 1.0 and gaps[-1] > 0.5
    # a nudge (a takeover draining the sinks) lists at once
    before = len(runner.steps)
    task.nudge.set()
    await asyncio.sleep(0.05)
    assert len(runner.steps) == before + 1
    # a listing that found several segments at once halves the wait: 0.8 -> 0.4
    runner.news = 5
    task.nudge.set()
    await asyncio.sleep(0.6)
    assert 0.3 < runner.steps[-1] - runner.steps[-2] < 0.5
    stop.set()
    async with asyncio.timeout(5):
        await job
