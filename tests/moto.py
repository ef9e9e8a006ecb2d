"""moto's server for the tests (no tests here): KMS, Route 53 and SQS on one port.

``conftest.moto_server`` starts one per test session with ``running_moto`` (the
lab's ``MotoServer``: detached, from the virtualenv ``.venv-moto`` that ``make
venv`` builds, since moto pins its own botocore). It holds everything in memory,
so each test makes its own key, zone or queue under a unique name. ``client``
opens an aiobotocore client on it with static test credentials.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session

from agent.lab.moto import MotoServer
from agent.lab.ports import free_port
from agent.lab.processes import LabError

ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "secret"
REGION = "us-east-1"


@contextlib.asynccontextmanager
async def running_moto(home: Path) -> AsyncIterator[MotoServer]:
    """moto's server on a free loopback port, ready; stopped when the block ends."""
    try:
        server = MotoServer(home, free_port())
    except LabError as exc:
        pytest.fail(f"{exc} ({exc.hint})")
    try:
        await server.start()
        await server.wait_ready()
        yield server
    finally:
        server.resume()  # a test that paused it and failed
        await server.stop()


def client(server: MotoServer, service: str, **config: Any) -> Any:
    """An aiobotocore client of ``service`` on moto (an async context manager)."""
    return get_session().create_client(
        service,
        region_name=REGION,
        endpoint_url=server.endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        **config,
    )
