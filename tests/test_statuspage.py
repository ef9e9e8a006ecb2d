"""The status page: its pure parts, and the page itself in headless Chromium over real agents."""

from __future__ import annotations

import asyncio
import html
import re
import shutil
import tomllib
from pathlib import Path

import aiohttp
import pytest

from agent.lab import Lab
from agent.statuspage import RpoHistory, local_alerts, peer_summary
from tests.support import eventually
from tests.test_agent import Pair

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def stream(task: str, **fields: object) -> dict[str, object]:
    return {"task": task, "stream": task.split("->")[0], "state": "running", **fields}


def test_history_keeps_recent_samples_per_stream_and_forgets_removed_ones() -> None:
    h = RpoHistory(size=3)
    for i in range(5):
        h.add(100.0 + i, {"streams": [stream("s->b", rpo_seconds=0.1 * i)]})
    h.add(105.0, {"streams": [stream("vault->t", apply_lag_seconds=2.0)]})
    assert h.series() == {"vault->t": [(105.0, 2.0)]}
    h.add(106.0, {"streams": [stream("s->b", rpo_seconds=None)]})  # no value: no sample
    assert h.series() == {}


def test_peer_summary_reads_role_and_epoch_from_metrics() -> None:
    text = 'dragent_role{role="active"} 0.0\ndragent_role{role="passive"} 1.0\ndragent_epoch 4.0\n'
    assert peer_summary(text) == {"role": "passive", "epoch": 4}
    with pytest.raises(ValueError):
        peer_summary("up 1\n")


def test_local_alerts_mirror_the_prometheus_rules() -> None:
    status = {
        "streams": [
            stream("pg->b", side="source", peer="b", rpo_seconds=7.5, rpo_target_seconds=5),
            stream("obj->b", side="source", peer="b", rpo_seconds=1.0, rpo_target_seconds=10),
            stream("vault->pg", state="halted", last_error="bad root"),
        ]
    }
    verifications = {"pg": {"state": "done", "ok": False, "differences": 2, "summary": "x"}}
    alerts = local_alerts(status, verifications)
    assert [a["alert"] for a in alerts] == [
        "DragentRpoOverTarget",
        "DragentStreamHalted",
        "DragentVerificationMismatch",
    ]
    assert "7.5s" in alerts[0]["summary"] and "bad root" in alerts[1]["summary"]
    assert local_alerts({"streams": [stream("x->b", rpo_seconds=0.1)]}, {}) == []


# -- the page in Chromium ------------------------------------------------------------------


async def dump_dom(url: str, profile: Path) -> str:
    """The DOM after the page's script ran (virtual time lets its polls complete)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed (deploy/lab/install-system-deps.sh installs it)")
    proc = await asyncio.create_subprocess_exec(
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--virtual-time-budget=3000",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(90):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode()


def text_of(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>(.*?)</(span|ul|tbody)>', dom, re.DOTALL)
    assert match, f"no element {element_id}"
    return html.unescape(re.sub(r"<[^>]+>", " ", match.group(1)))


@pytest.mark.lab
async def test_status_page_shows_roles_watermarks_rpo_alerts_and_verification(
    lab: Lab, tmp_path: Path, unique: str
) -> None:
    pair = Pair(lab, tmp_path, unique)
    pair.a = pair.agent("a", policy={"default_rpo_seconds": 0.001})  # an alert to show
    http_cfg = tomllib.loads(lab.config_path("b").read_text())["http"]
    (tmp_path / "token").write_text("p4ge-token")
    pair.b = pair.agent("b", http={**http_cfg, "token": f"file:{tmp_path / 'token'}"})
    auth = {"Authorization": "Bearer p4ge-token"}
    try:
        await pair.b.start()
        await pair.a.start()
        await pair.a.wait_ready()
        async with aiohttp.ClientSession() as http:

            async def history(url: str, headers: dict[str, str]) -> bool:
                async with http.get(f"{url}/status", headers=headers) as resp:
                    body = await resp.json() if resp.status == 200 else {}
                return any(len(v) >= 3 for v in body.get("rpo_history", {}).values())

            await eventually(lambda: history(pair.a.url, {}), within=30)
            await eventually(lambda: history(pair.b.url, auth), within=30)

            async def peer_b_seen() -> bool:  # a polls its peers every 5 s; b may start late
                async with http.get(f"{pair.a.url}/status") as resp:
                    body = await resp.json()
                return any(p.get("region") == "b" and p.get("reachable") for p in body["peers"])

            await eventually(peer_b_seen, within=30)
            async with http.post(f"{pair.b.url}/api/v1/verify/{unique}", headers=auth) as resp:
                job = await resp.json()

            async def verified() -> bool:
                url = f"{pair.b.url}/api/v1/reports/{job['id']}"
                async with http.get(url, headers=auth) as resp:
                    return resp.status == 200

            await eventually(verified, within=60)

        dom_a = await dump_dom(f"{pair.a.url}/", tmp_path / "profile-a")
        assert text_of(dom_a, "region").strip() == "a"
        assert text_of(dom_a, "role").strip() == "active"
        rows = text_of(dom_a, "streams")
        assert f"{unique}->b" in rows and "running" in rows
        assert re.search(r'class="num rpo (bad|ok)">\d+\.\d\d s<', dom_a)
        assert re.search(r'class="spark"[^>]*data-points="([3-9]|\d\d+)"', dom_a)
        assert "DragentRpoOverTarget" in text_of(dom_a, "alerts")
        regions = text_of(dom_a, "regions")  # b's role, read from b's open /metrics
        assert re.search(r"a \(this agent\)\s+active\s+1", regions), regions
        assert re.search(r"\bb\s+passive\s+1\s+" + re.escape(pair.b.url), regions), regions

        dom_b = await dump_dom(f"{pair.b.url}/#token=p4ge-token", tmp_path / "profile-b")
        assert text_of(dom_b, "role").strip() == "passive"
        assert f"vault->{unique}" in text_of(dom_b, "streams")
        verifications = text_of(dom_b, "verifications")
        assert unique in verifications and "match" in verifications and job["id"] in verifications
        assert "none" in text_of(dom_b, "alerts")

        dom_denied = await dump_dom(f"{pair.b.url}/", tmp_path / "profile-c")  # no token
        assert "answered 401" in dom_denied
        assert unique not in dom_denied
    finally:
        await pair.a.stop(grace=10)
        await pair.b.stop(grace=10)
