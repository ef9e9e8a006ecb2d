"""Runbooks from the live configuration: the lab's real names, and commands that run."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path

import pytest
import tomli_w

from agent.config import load_config
from agent.evidence import EvidenceLog
from agent.lab import Lab
from agent.runbook import commands, render_runbook
from agent.runbook.comms import FIRST_STATUS_MINUTES, UPDATE_EVERY_MINUTES


def lab_config(lab: Lab, name: str, tmp_path: Path) -> Path:
    """Region b's agent.toml with its own region name, data_dir and synthetic stream."""
    data = lab.agent_config("b")
    data["region"] = name
    data["data_dir"] = str(tmp_path / "agent")
    data["streams"] = [{"name": name, "kind": "synthetic", "synthetic": {"record_size": 64}}]
    path = tmp_path / "agent.toml"
    path.write_text(tomli_w.dumps(data))
    return path


async def run(line: str) -> tuple[int, str]:
    argv = shlex.split(line)
    assert argv[0] == "dragent", line
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *argv[1:], env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(120):
        out, _ = await proc.communicate()
    return int(proc.returncode or 0), out.decode()


@pytest.mark.lab
async def test_lab_runbook_names_real_endpoints_and_its_restore_commands_work(
    lab: Lab, unique: str, tmp_path: Path
) -> None:
    from tests.test_drills import publish

    path = lab_config(lab, unique, tmp_path)
    cfg = load_config(path)
    await publish(cfg, unique, segments=3, per=20)

    md = render_runbook(cfg, path)  # what `dragent runbook --config PATH` prints
    for real in (
        f"region {unique}", "| a | peer |", lab.agent_url("a"), lab.s3_endpoint("b"),
        lab.s3_endpoint("a"), lab.etcd_endpoints[0], cfg.http.listen, "dragent-vault",
    ):  # fmt: skip
        assert real in md, real

    steps = commands(md, "Restore")
    assert steps == [
        f"dragent vault verify --config {path} --stream {unique}",
        f"dragent drill restore --config {path} --stream {unique}",
        f"dragent evidence verify --config {path}",
        f"dragent evidence ls --config {path}",
    ]
    outputs = []
    for line in steps:
        code, out = await run(line)
        assert code == 0, f"{line}\n{out}"
        outputs.append(out)
    assert "60 records" in outputs[0] and "ok" in outputs[0]
    assert "PASS: " in outputs[1] and "Merkle roots equal" in outputs[1]
    assert "intact" in outputs[2]
    assert "drill.restore" in outputs[3]

    log = await EvidenceLog.open(cfg)
    try:
        drills = [e for e in await log.entries() if e["type"] == "drill.restore"]
    finally:
        await log.aclose()
    assert len(drills) == 1 and drills[0]["data"]["ok"] and drills[0]["data"]["rto_seconds"] > 0


def test_runbook_sections_and_communication_plan(tmp_path: Path) -> None:
    from tests.test_compliance import lab_free_config

    cfg = lab_free_config(tmp_path)
    md = render_runbook(cfg, Path("/etc/dragent/b.toml"))
    for section in ("Restore", "Failover", "Switchover", "Failback", "Communication plan"):
        assert f"\n## {section}" in md
    assert f"within {FIRST_STATUS_MINUTES} minutes" in md
    assert f"every {UPDATE_EVERY_MINUTES} minutes" in md
    assert "Data lost: {{data_lost}}" in md and "{{rto_measured}}" in md
    assert "dragent drill restore --config /etc/dragent/b.toml --stream db" in md
    html = render_runbook(cfg, Path("/etc/dragent/b.toml"), fmt="html")
    assert html.startswith("<!doctype html>") and "<h2>Communication plan</h2>" in html
