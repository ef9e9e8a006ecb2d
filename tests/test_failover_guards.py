"""Guard rails on the lab: the cluster-wide pause pages instead of promoting,
resuming lets the takeover happen, and both are notified to a webhook with a
body Slack and PagerDuty-style receivers accept. Also the ``dragent ha`` CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import tomli_w
from aiohttp import web

from agent.lab import Lab
from agent.lab.failover_drill import Drill
from tests.support import eventually

pytestmark = pytest.mark.lab


@pytest_asyncio.fixture(loop_scope="session")
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[dict[str, Any]]]:
    got: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    monkeypatch.setenv("DRAGENT_TEST_HOOK", f"http://127.0.0.1:{port}/hook")
    yield got
    await runner.cleanup()


async def test_pause_pages_then_resume_takes_over(
    lab: Lab, unique: str, tmp_path: Path, receiver: list[dict[str, Any]]
) -> None:
    hooks = {"notify": ["env:DRAGENT_TEST_HOOK"]}
    async with Drill(lab, unique, tmp_path, failover=hooks) as drill:
        await drill.ready(30)
        b = drill.coordinators["b"]
        await b.lease.set_paused(True, "test")
        # the active agent dies and region a's database hangs (b's probes time out)
        await drill.kill("a")
        await lab.fault("a", "postgres", "pause")
        try:
            await eventually(
                lambda: any(r["payload"]["severity"] == "critical" for r in receiver), within=20
            )
            page = receiver[0]
            assert "paused" in page["text"] and page["event_action"] == "trigger"
            assert page["payload"]["custom_details"]["kind"] == "page"
            await asyncio.sleep(2 * b.f.renew_interval)
            assert b.role == "passive" and not b.holding
            # resuming lets the takeover go ahead
            await b.lease.set_paused(False)
            await eventually(lambda: b.writable and b.last_record is not None, within=30)
            await eventually(
                lambda: any(r["payload"]["custom_details"]["kind"] == "failover" for r in receiver),
                within=10,
            )
        finally:
            await lab.fault("a", "postgres", "resume")
    done = next(r for r in receiver if r["payload"]["custom_details"]["kind"] == "failover")
    assert done["text"].startswith("dragent failover a -> b")
    assert done["payload"]["custom_details"]["rto_seconds"] > 0


def test_ha_cli_pause_status_resume(lab: Lab, unique: str, tmp_path: Path) -> None:
    data = lab.agent_config("a")
    data["etcd"] = {"endpoints": lab.etcd_endpoints, "prefix": f"/dragent-cli/{unique}"}
    path = tmp_path / "a.toml"
    path.write_text(tomli_w.dumps(data))

    def ha(*args: str) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "agent", "ha", *args, "--config", str(path)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
        return json.loads(out.stdout)

    assert ha("status")["paused"] is False
    assert ha("pause", "--why", "maintenance")["paused"] is True
    assert ha("status")["paused"] is True
    assert ha("resume")["paused"] is False


async def test_operator_failover_refused_while_the_lease_is_held(
    lab: Lab, unique: str, tmp_path: Path
) -> None:
    from agent.coordination.switchover import SwitchoverError, run

    async with Drill(lab, unique, tmp_path) as drill:
        await drill.ready(30)
        b = drill.coordinators["b"]
        with pytest.raises(SwitchoverError, match="the leader lease is held"):
            await run(drill.config("b"), old_dsn=None, planned=False)
        view = await b.lease.view()
        assert (view.leader, view.epoch, view.paused) == ("a", 1, False)
        assert drill.coordinators["a"].writable
