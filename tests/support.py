"""Helpers for scenario tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from agent.agentproc import AgentProcess
from agent.lab import Lab
from agent.lab.bind import BindServer, lab_dns
from agent.lab.netns import unavailable
from agent.supervise import StreamTask, run_stream
from replicators.metrics import Metrics


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], within: float, every: float = 0.1
) -> None:
    """Wait until ``check()`` is true; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(every)


def lab_agent(lab: Lab, region: str, config: Path, workdir: Path) -> AgentProcess:
    """An agent process for ``region`` of the lab, its log and pid file in ``workdir``."""
    return AgentProcess(
        config, workdir / f"{region}.log", workdir / f"{region}.pid", lab.agent_url(region)
    )


_NO_NETNS = unavailable()
needs_netns = pytest.mark.skipif(
    _NO_NETNS is not None, reason=f"the netns lab cannot run here: {_NO_NETNS}"
)


@contextlib.asynccontextmanager
async def netns_lab(root: Path) -> AsyncIterator[Lab]:
    """A lab in network namespaces at ``root`` (a free slot), purged on exit:
    servers, namespaces, links, bridge and rules."""
    lab = Lab(root, network="netns")
    try:
        await lab.up()
        yield lab
    finally:
        await lab.down(purge=True)


@contextlib.asynccontextmanager
async def fresh_dns(lab: Lab) -> AsyncIterator[BindServer]:
    """The lab's BIND server, restarted with a fresh zone for these tests, then stopped."""
    server = lab_dns(lab)
    await server.stop()
    await server.start()
    await server.wait_ready()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running(task: StreamTask) -> AsyncIterator[None]:
    """``run_stream(task)`` until the block ends (then a bounded drain)."""
    stop = asyncio.Event()
    job = asyncio.create_task(run_stream(task, stop, Metrics(CollectorRegistry())))
    try:
        yield
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await job


async def takes_writes(dsn: str) -> bool:
    """True if the database at ``dsn`` commits a write, False if it is read-only."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS fencing_probe (id int)")
        await conn.execute("INSERT INTO fencing_probe VALUES (1)")
        return True
    except asyncpg.ReadOnlySQLTransactionError:
        return False
    finally:
        await conn.close()
