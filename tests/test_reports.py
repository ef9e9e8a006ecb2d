"""Compliance reports: built from real evidence in the vault, signed, rendered in Chromium."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from agent.compliance import controls as c
from agent.config import AgentConfig
from agent.evidence import EvidenceLog, entry_key
from agent.reports import svg
from agent.reports.compliance import check_report, compliance_report
from agent.reports.render import to_html, to_markdown
from replicators.errors import IntegrityError
from verifiers.report import check, load_or_create_signing_key

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip


class Charts(HTMLParser):
    """Collects every chart's points (circles and bars) and target lines from a DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict[str, list[Any]]] = {}
        self._current: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg" and a.get("data-chart"):
            self._current = str(a["data-chart"])
            self.charts[self._current] = {"points": [], "bars": [], "targets": []}
        elif self._current and tag == "circle" and a.get("class") == "point":
            self.charts[self._current]["points"].append((float(a["data-t"]), float(a["data-v"])))
        elif self._current and tag == "rect" and a.get("class") == "bar":
            self.charts[self._current]["bars"].append(float(a["data-v"]))
        elif self._current and tag == "line" and a.get("class") == "target":
            self.charts[self._current]["targets"].append(float(a["data-v"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._current = None


def charts_of(html: str) -> dict[str, dict[str, list[Any]]]:
    parser = Charts()
    parser.feed(html)
    return parser.charts


def test_svg_points_carry_their_values() -> None:
    chart = svg.time_series("rpo-x", "t", {"x": [(100.0, 0.5), (200.0, 7.25)]}, target=5.0)
    assert charts_of(chart)["rpo-x"] == {
        "points": [(100.0, 0.5), (200.0, 7.25)], "bars": [], "targets": [5.0],
    }  # fmt: skip
    bars = svg.bars("rto", "t", [("a", 1.5, True), ("b", 90.0, False)], target=60.0)
    assert charts_of(bars)["rto"]["bars"] == [1.5, 90.0]


async def dump_dom(html_file: Path, profile: Path) -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed (deploy/lab/install-system-deps.sh installs it)")
    proc = await asyncio.create_subprocess_exec(
        chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
        html_file.as_uri(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(90):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode()


@pytest.mark.lab
async def test_html_report_renders_in_chromium_with_the_periods_data(
    cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    from tests.test_drills import drill_config, publish

    # no peers: the peers' evidence logs in the shared lab hold other tests' drills
    cfg = drill_config(cfg_b, unique, tmp_path).model_copy(update={"peers": []})
    await publish(cfg, unique, segments=2, per=10)
    from agent.drills import run_restore_drill

    start = round(time.time()) - 3 * 3600.0
    samples = {
        start - 600: 0.2,  # before the period: not charted
        start + 600: 0.4,
        start + 1800: 7.5,  # above the 5 s target
        start + 5400: 0.3,
    }
    log = await EvidenceLog.open(cfg)
    try:
        for t, v in samples.items():
            streams = {unique: {"max_rpo": v, "target": 5.0}}
            await log.append(c.RPO_SAMPLE, {"period": [t - 60, t], "streams": streams}, at=t)
        drills = []
        for _ in range(2):
            _, entry = await run_restore_drill(cfg, log)
            drills.append(entry)
    finally:
        await log.aclose()
    now = max(d["time"] for d in drills) + 1
    report = await compliance_report(cfg, start, now, now=now)
    check(report, load_or_create_signing_key(cfg.signing_key_path).public_key())

    html_file = tmp_path / "report.html"
    html_file.write_text(to_html(report))
    dom = await dump_dom(html_file, tmp_path / "chromium-profile")
    charts = charts_of(dom)
    assert 'id="verdict"' in dom and "Compliance report" in dom
    want = sorted((t, v) for t, v in samples.items() if start <= t <= now)
    assert sorted(charts[f"rpo-{unique}"]["points"]) == want
    assert charts[f"rpo-{unique}"]["targets"] == [5.0]
    assert charts["drill-rto"]["bars"] == [pytest.approx(d["data"]["rto_seconds"]) for d in drills]
    assert charts["drill-rto"]["targets"] == [cfg.policy.rto_seconds]
    rpo_control = next(r for r in report["controls"] if r["control"] == "rpo-within-target")
    assert rpo_control["status"] == "fail"  # the 7.5 s sample is inside the policy's window

    md = to_markdown(report)
    assert f"| {unique} | 5s | 3 | 7.500s | 1 |" in md
    assert json.loads(json.dumps(report))["signature"]["alg"] == "ed25519"

    # the report checks against the log; a changed head entry makes it fail
    public = load_or_create_signing_key(cfg.signing_key_path).public_key()
    await check_report(cfg, report, public)
    head = report["evidence"][cfg.region]["seq"]
    store_log = await EvidenceLog.open(cfg)
    try:
        key = entry_key(cfg.region, head)
        raw = await store_log.store.get(key)
        await store_log.store.delete(key)
        await store_log.store.put(key, raw.replace(b'"ok":true', b'"ok":false', 1))
    finally:
        await store_log.aclose()
    with pytest.raises(IntegrityError, match="changed"):
        await check_report(cfg, report, public)


@pytest.mark.lab
async def test_report_commands_write_and_check_a_signed_report(
    lab: Any, unique: str, tmp_path: Path
) -> None:
    from agent.cli import main
    from tests.test_runbook import lab_config

    path = lab_config(lab, unique, tmp_path)
    out = tmp_path / "report.json"
    for fmt, name in (("json", out), ("md", tmp_path / "r.md"), ("html", tmp_path / "r.html")):
        argv = ["report", "compliance", "--config", str(path), "--from", "1d", "--format", fmt]
        assert await asyncio.to_thread(main, [*argv, "--out", str(name)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "compliance" and report["evidence"][unique]["chain_ok"]
    for checked in (out, tmp_path / "r.html"):
        assert (
            await asyncio.to_thread(main, ["report", "check", str(checked), "--config", str(path)])
            == 0
        )
    report["summary"] = "all fine"  # any change breaks the signature
    out.write_text(json.dumps(report))
    assert await asyncio.to_thread(main, ["report", "check", str(out), "--config", str(path)]) == 1
