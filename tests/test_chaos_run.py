"""A seeded chaos run (docs/chaos.md) on a lab in network namespaces, judged.

``dragent lab chaos --minutes 2.5 --seed 21 --json`` as an operator runs it:
both agents and a keeper per region as real processes, three clients
writing, a nemesis drawing about eight faults of every kind from the seed,
then heal, a quiet period, and the checker. The verdict must be ok: no
acknowledged write lost beyond the RPO target, no split brain, the vault
verifies or names exactly the corrupted segments and none was applied. The
timeline it writes opens in headless Chromium.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.support import needs_netns
from tests.test_statuspage import CHROMIUM_FLAGS

pytestmark = [pytest.mark.lab, needs_netns, pytest.mark.timeout(900)]

SEED = 21


async def test_a_seeded_chaos_run_keeps_every_promise(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "agent", "lab", "chaos", "--minutes", "2.5"]
    argv += ["--seed", str(SEED), "--dir", str(tmp_path), "--json"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(840):
        out, err = await proc.communicate()
    run = tmp_path / f"run-{SEED}"
    assert out, err.decode()[-3000:]
    verdict = json.loads(out)
    assert verdict == json.loads((run / "verdict.json").read_text())
    summary = {k: verdict[k] for k in ("ok", "lost", "split_brain", "faults")}
    assert verdict["ok"], json.dumps(summary, indent=1)[-3000:]
    assert proc.returncode == 0
    assert sum(verdict["faults"].values()) >= 5, verdict["faults"]
    assert verdict["writes"]["acknowledged"] > 500
    assert not verdict["split_brain"]
    history = (run / "history.jsonl").read_text().splitlines()
    assert json.loads(history[0])["type"] == "start" and json.loads(history[-1])["type"] == "end"
    await _opens_in_chromium(run / "timeline.html", tmp_path)


async def _opens_in_chromium(page: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed (deploy/lab/install-system-deps.sh installs it)")
    shot = tmp_path / "timeline.png"
    proc = await asyncio.create_subprocess_exec(
        chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}", "--window-size=1400,900", page.as_uri(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(90):
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert shot.stat().st_size > 10_000
