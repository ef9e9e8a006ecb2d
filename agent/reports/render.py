"""Compliance report renderings: Markdown (for review in a repository) and HTML.

The HTML is one self-contained file: inline CSS, inline SVG charts, no
script that runs and nothing fetched; the signed JSON report is embedded in
a ``<script type="application/json" id="dragent-report">`` block so the
file itself can be checked (``dragent report check``).
"""

from __future__ import annotations

import datetime as dt
import json
from html import escape
from typing import Any

from agent.reports import svg


def iso(t: float | None) -> str:
    if t is None:
        return "-"
    return dt.datetime.fromtimestamp(float(t), dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _cite(row: dict[str, Any]) -> str:
    return f"{row.get('region')}#{row.get('seq')}"


def _rto(row: dict[str, Any]) -> str:
    rto = row.get("rto_seconds")
    return "-" if rto is None else f"{float(rto):.2f}s"


def to_markdown(report: dict[str, Any]) -> str:
    verdict = "PASS" if report.get("ok") else "FAIL"
    period = report["period"]
    lines = [
        f"# Compliance report: region {report['region']}",
        "",
        f"**{verdict}** — {report['summary']}",
        "",
        f"Period: {iso(period['from'])} to {iso(period['to'])}. "
        f"Generated {iso(report.get('generated_at'))}.",
        "",
        "## Controls",
        "",
        "| control | status | reason | clauses | evidence |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in report["controls"]:
        cites = " ".join(_cite(e) for e in r["evidence"]) or "-"
        lines.append(
            f"| {r['control']} | {r['status'].upper()} | {r['reason']} | "
            f"{', '.join(r['clauses'])} | {cites} |"
        )
    lines += ["", "## RPO per stream", "", "| stream | target | samples | max | above target |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for stream, row in sorted(report["rpo"].items()):
        lines.append(
            f"| {stream} | {row['target']:g}s | {len(row['points'])} | {row['max']:.3f}s | "
            f"{row['breaches']} |"
        )
    lines += ["", "## Restore drills", "", "| time | evidence | ok | RTO | target | Merkle |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for d in report["drills"]:
        merkle = "equal" if d.get("equal") else "differ"
        lines.append(
            f"| {iso(d['time'])} | {_cite(d)} | {'yes' if d['ok'] else 'NO'} | {_rto(d)} | "
            f"{d.get('rto_target')}s | {merkle} |"
        )
    lines += ["", "## Verifications", "", "| time | evidence | stream | ok | summary |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for v in report["verifications"]:
        ok = "yes" if v["ok"] else "NO"
        lines.append(f"| {iso(v['time'])} | {_cite(v)} | {v['stream']} | {ok} | {v['summary']} |")
    lines += ["", "## Events", ""]
    lines += [f"- {iso(e['time'])} {_cite(e)} {e['type']}" for e in report["events"]] or ["none"]
    lines += ["", "## Evidence logs", ""]
    for region, head in sorted(report["evidence"].items()):
        lines.append(
            f"- {region}: head seq {head.get('seq')} `{head.get('hash')}`, "
            f"{head.get('entries')} entries, chain {'intact' if head.get('chain_ok') else 'BROKEN'}"
        )
    sig = report.get("signature") or {}
    lines += ["", f"Signed {sig.get('alg', 'no')} by {sig.get('key_id', '-')}.", ""]
    return "\n".join(lines)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:62rem;margin:2rem auto;padding:0 1rem}"
    "table{border-collapse:collapse;width:100%;margin:1rem 0;font-size:.9rem}"
    "td,th{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}"
    ".pass{color:#1a7f37;font-weight:bold}.fail{color:#cf222e;font-weight:bold}"
    ".unknown{color:#9a6700;font-weight:bold}code{font-size:.8rem}"
)


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _controls_html(report: dict[str, Any]) -> str:
    rows = []
    for r in report["controls"]:
        cites = " ".join(escape(_cite(e)) for e in r["evidence"]) or "-"
        status = f'<span class="{r["status"]}">{r["status"].upper()}</span>'
        rows.append(
            [escape(r["control"]), status, escape(r["reason"]), escape(", ".join(r["clauses"])),
             cites]
        )  # fmt: skip
    return _table(["control", "status", "reason", "clauses", "evidence"], rows)


def _charts(report: dict[str, Any]) -> str:
    period = (float(report["period"]["from"]), float(report["period"]["to"]))
    parts = []
    for stream, row in sorted(report["rpo"].items()):
        points = [(float(t), float(v)) for t, v in row["points"]]
        title = f"RPO of {stream} (highest per sample) vs target"
        chart = svg.time_series(
            f"rpo-{stream}", title, {stream: points}, target=float(row["target"]), span=period
        )
        parts.append(chart)
    if not report["rpo"]:
        parts.append("<p>No RPO samples recorded in the period.</p>")
    items = [
        (iso(d["time"])[5:16], float(d["rto_seconds"] or 0.0), bool(d["ok"]))
        for d in report["drills"]
    ]
    parts.append(
        svg.bars("drill-rto", "Restore drill RTO", items, target=report["targets"]["rto_seconds"])
    )
    return "\n".join(parts)


def to_html(report: dict[str, Any]) -> str:
    verdict = "PASS" if report.get("ok") else "FAIL"
    period = report["period"]
    drills = [
        [escape(iso(d["time"])), escape(_cite(d)), "yes" if d["ok"] else "<b>NO</b>",
         escape(_rto(d)), escape("equal" if d.get("equal") else "differ"),
         escape(", ".join(f"{k} {v:.2f}s" for k, v in d.get("phases", {}).items()))]
        for d in report["drills"]
    ]  # fmt: skip
    checks = [
        [escape(iso(v["time"])), escape(_cite(v)), escape(str(v["stream"])),
         "yes" if v["ok"] else "<b>NO</b>", escape(v["summary"])]
        for v in report["verifications"]
    ]  # fmt: skip
    events = [
        [escape(iso(e["time"])), escape(_cite(e)), escape(e["type"])] for e in report["events"]
    ]
    heads = [
        [escape(r), str(h.get("seq")), f"<code>{escape(str(h.get('hash')))}</code>",
         str(h.get("entries")), "intact" if h.get("chain_ok") else "<b>BROKEN</b>"]
        for r, h in sorted(report["evidence"].items())
    ]  # fmt: skip
    sig = report.get("signature") or {}
    embedded = json.dumps(report, sort_keys=True).replace("</", "<\\/")
    return "".join(
        [
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>dragent compliance report: {escape(report['region'])}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>Compliance report: region {escape(report['region'])}</h1>",
            f'<p id="verdict" class="{verdict.lower()}">{verdict}: {escape(report["summary"])}</p>',
            f"<p>Period {escape(iso(period['from']))} to {escape(iso(period['to']))}; "
            f"generated {escape(iso(report.get('generated_at')))}.</p>",
            "<h2>Controls</h2>", _controls_html(report),
            "<h2>Charts</h2>", _charts(report),
            "<h2>Restore drills</h2>",
            _table(["time", "evidence", "ok", "RTO", "Merkle", "phases"], drills),
            "<h2>Verifications</h2>",
            _table(["time", "evidence", "stream", "ok", "summary"], checks),
            "<h2>Events</h2>", _table(["time", "evidence", "type"], events),
            "<h2>Evidence logs</h2>",
            _table(["region", "head seq", "head hash", "entries", "chain"], heads),
            f"<p>Signed {escape(str(sig.get('alg', 'no')))} by "
            f"<code>{escape(str(sig.get('key_id', '-')))}</code>.</p>",
            f'<script type="application/json" id="dragent-report">{embedded}</script>',
            "</body></html>",
        ]
    )  # fmt: skip
