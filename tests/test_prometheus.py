"""The Prometheus rules: promtool checks and unit tests, and a real Prometheus over the lab.

The integration test runs Debian's ``prometheus`` against the two lab agents,
with region a's RPO target broken on purpose (a 1 ms target that no
shipper can meet) and sees ``DragentRpoOverTarget`` fire for exactly that
stream. The rules file is the real one; only each alert's ``for`` is
shortened so the test does not wait a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml

from agent.lab import Lab
from tests.support import eventually
from tests.test_agent import Pair

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "dragent.rules.yml"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing")


@needs_promtool
def test_promtool_check_rules() -> None:
    done = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_unit_tests_of_every_alert() -> None:
    tests = sorted((PROM / "tests").glob("*.test.yml"))
    done = subprocess.run(
        ["promtool", "test", "rules", *map(str, tests)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = "\n".join(p.read_text() for p in tests)
    rules = yaml.safe_load(RULES.read_text())
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    untested = [a for a in alerts if f"alertname: {a}\n" not in tested]
    assert not untested, f"alerts without a promtool test: {untested}"


# -- a real Prometheus over the lab ----------------------------------------------------------


def fast_rules(dest: Path) -> Path:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    dest.write_text(yaml.safe_dump(rules, sort_keys=False))
    return dest


def prometheus_config(lab: Lab, rules: Path) -> dict[str, Any]:
    targets = [lab.agent_url(r).removeprefix("http://") for r in ("a", "b")]
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": "dragent", "static_configs": [{"targets": targets}]},
        ],
    }


@pytest_asyncio.fixture(loop_scope="session")
async def prometheus(lab: Lab, tmp_path: Path) -> AsyncIterator[str]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus missing (Debian package prometheus)")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(lab, fast_rules(tmp_path / "rules.yml"))))
    listen = f"127.0.0.1:{lab.port('shared', 'prometheus')}"
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115, ASYNC230 - handed to the child
    proc = await asyncio.create_subprocess_exec(
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address={listen}",
        "--storage.tsdb.retention.time=1h",
        stdout=log,
        stderr=log,
    )
    log.close()
    try:
        yield f"http://{listen}"
    finally:
        proc.terminate()
        try:
            async with asyncio.timeout(15):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _get(url: str) -> dict[str, Any] | None:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http,
            http.get(url) as resp,
        ):
            return dict(await resp.json()) if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


@pytest.mark.lab
async def test_real_prometheus_fires_the_rpo_alert_when_the_target_is_broken(
    lab: Lab, tmp_path: Path, unique: str, prometheus: str
) -> None:
    (tmp_path / "agents").mkdir()
    pair = Pair(lab, tmp_path / "agents", unique)
    pair.a = pair.agent("a", policy={"default_rpo_seconds": 0.001})
    try:
        await pair.b.start()
        await pair.a.start()
        await pair.a.wait_ready()
        await pair.b.wait_ready()

        async def both_up() -> bool:
            body = await _get(f"{prometheus}/api/v1/targets")
            active = (body or {}).get("data", {}).get("activeTargets", [])
            return len(active) == 2 and all(t["health"] == "up" for t in active)

        await eventually(both_up, within=60, every=0.5)
        firing: list[dict[str, Any]] = []

        async def rpo_alert() -> bool:
            body = await _get(f"{prometheus}/api/v1/alerts")
            alerts = (body or {}).get("data", {}).get("alerts", [])
            firing[:] = [
                a
                for a in alerts
                if a["labels"]["alertname"] == "DragentRpoOverTarget" and a["state"] == "firing"
            ]
            return bool(firing)

        await eventually(rpo_alert, within=60, every=0.5)
        (alert,) = firing
        assert alert["labels"]["stream"] == unique and alert["labels"]["peer"] == "b"
        assert alert["labels"]["severity"] == "critical"
        assert alert["labels"]["instance"] == lab.agent_url("a").removeprefix("http://")
        body = await _get(f"{prometheus}/api/v1/query?query=dragent_rpo_target_seconds")
        values = [float(r["value"][1]) for r in (body or {})["data"]["result"]]
        assert values == [0.001]
    finally:
        with contextlib.suppress(Exception):
            await pair.a.stop(grace=10)
        await pair.b.stop(grace=10)


@pytest.mark.lab
async def test_a_broken_stream_fires_the_rpo_alert_with_the_real_target(
    lab: Lab, tmp_path: Path, unique: str, prometheus: str
) -> None:
    """Region a's stream cannot write to b's vault (a wrong secret): nothing ships, the
    RPO grows with wall time past the 5 s target, and after the rule's minute the alert
    fires in a real Prometheus; /status and the compliance control say the same."""
    import tomllib

    (tmp_path / "agents").mkdir()
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not-the-secret\n")
    wrong.chmod(0o600)
    peers = tomllib.loads(lab.config_path("a").read_text())["peers"]
    peers[0]["vault"]["secret_key"] = f"file:{wrong}"
    pair = Pair(lab, tmp_path / "agents", unique)
    pair.a = pair.agent("a", peers=peers, policy={"default_rpo_seconds": 5})
    try:
        await pair.a.start()  # never ready: its stream retries

        async def rpo_of_a() -> float:
            status = await pair.a.status()
            streams = (status or {}).get("streams") or [{}]
            return float(streams[0].get("rpo_seconds") or 0.0)

        await eventually(lambda: _above(rpo_of_a, 5.0), within=60, every=0.5)
        first = await rpo_of_a()
        await asyncio.sleep(3.0)
        assert await rpo_of_a() >= first + 2.5  # grows with wall time

        async def rpo_alert() -> bool:
            body = await _get(f"{prometheus}/api/v1/alerts")
            alerts = (body or {}).get("data", {}).get("alerts", [])
            return any(
                a["labels"]["alertname"] == "DragentRpoOverTarget"
                and a["labels"]["stream"] == unique
                and a["state"] == "firing"
                for a in alerts
            )

        await eventually(rpo_alert, within=120, every=1.0)

        async def control_fails() -> bool:
            status = await pair.a.status()
            controls = (status or {}).get("compliance", {}).get("controls", [])
            return any(
                c["control"] == "rpo-within-target" and c["status"] == "fail" for c in controls
            )

        await eventually(control_fails, within=90, every=1.0)
    finally:
        with contextlib.suppress(Exception):
            await pair.a.stop(grace=10)


async def _above(read: Any, value: float) -> bool:
    return bool(await read() > value)
