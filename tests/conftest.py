"""Shared fixtures: one lab (real PostgreSQL, SeaweedFS, etcd) per test session."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from agent.config import AgentConfig, load_config
from agent.lab import Lab
from agent.lab.bind import BindServer
from agent.lab.moto import MotoServer
from tests.moto import running_moto
from tests.support import fresh_dns


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("lab") / "lab")
    try:
        await lab.up()
        yield lab
    finally:
        await lab.down(purge=True)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def moto_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MotoServer]:
    """moto's server (KMS, Route 53, SQS), one per session (``tests/moto.py``)."""
    async with running_moto(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def named(lab: Lab) -> AsyncIterator[BindServer]:
    """The lab's DNS server, fresh for each module that uses it."""
    async with fresh_dns(lab) as server:
        yield server


@pytest.fixture(scope="session")
def cfg_a(lab: Lab) -> AgentConfig:
    return load_config(lab.config_path("a"))


@pytest.fixture(scope="session")
def cfg_b(lab: Lab) -> AgentConfig:
    return load_config(lab.config_path("b"))


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> str:
    """A short name unique to this test, usable as a stream name or key prefix."""
    name = request.node.name.lower().replace("_", "-")
    return (
        "".join(c for c in name if c.isalnum() or c == "-")[:40].strip("-")
        + f"-{time.time_ns() % 10**6}"
    )


def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "agent"
    path.mkdir(exist_ok=True)
    return path
