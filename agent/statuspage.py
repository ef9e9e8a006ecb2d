"""The agent's status page: one self-contained HTML page, and the data it polls.

The page (``PAGE``) carries no data: its script polls ``/status`` every two
seconds and draws the regions and their roles (this one, and each peer's as
its open ``/metrics`` says), each stream's watermarks and RPO (with
a sparkline of the recent samples), the last verification of each stream, the
last drills and the open alerts. With a bearer token configured, the page
takes it from the URL fragment (``/#token=...``, never sent to the server or
its logs) and sends it with each poll.

The pure parts live here: ``peer_summary`` (a peer's role from its metrics),
``RpoHistory`` (a short in-memory history of RPO or
apply-lag samples per stream) and ``local_alerts`` (what this agent alone can
tell is wrong: the conditions of the Prometheus rules it can see itself).
The page's cost line is ``/status``'s ``cost`` (agent/costlog.py: the month's
estimate from the agent's cost counters).
"""

from __future__ import annotations

from collections import deque
from typing import Any

HISTORY = 300
"""Samples kept per stream (five minutes at one a second)."""


class RpoHistory:
    """Recent ``(time, seconds)`` samples per stream task: RPO (source) or apply lag (sink)."""

    def __init__(self, size: int = HISTORY) -> None:
        self._size = size
        self._series: dict[str, deque[tuple[float, float]]] = {}

    def add(self, now: float, status: dict[str, Any]) -> None:
        """Record one sample per stream of ``status``; streams gone from it are forgotten."""
        seen = set()
        for s in status.get("streams", []):
            value = s.get("rpo_seconds")
            if value is None:
                value = s.get("apply_lag_seconds")
            if value is None:
                continue
            key = s.get("task") or s.get("stream", "?")
            seen.add(key)
            series = self._series.setdefault(key, deque(maxlen=self._size))
            series.append((round(now, 3), round(float(value), 3)))
        for key in set(self._series) - seen:
            del self._series[key]

    def series(self) -> dict[str, list[tuple[float, float]]]:
        return {k: list(v) for k, v in self._series.items()}


def local_alerts(
    status: dict[str, Any], verifications: dict[str, dict[str, Any]]
) -> list[dict[str, str]]:
    """The alerts this agent can see for itself, most severe first.

    ``status`` is ``/status``; ``verifications`` maps a stream to the summary
    of its last verification job. Names match deploy/prometheus/dragent.rules.yml.
    """
    alerts: list[dict[str, str]] = []
    for s in status.get("streams", []):
        name = s.get("stream", "?")
        rpo, target = s.get("rpo_seconds"), s.get("rpo_target_seconds")
        if rpo is not None and target is not None and rpo > target:
            alerts.append(
                _alert(
                    "DragentRpoOverTarget",
                    "critical",
                    f"RPO of {name} to {s.get('peer')} is {rpo:.1f}s, over its {target:g}s target",
                )
            )
        if s.get("state") == "halted":
            why = s.get("last_error") or s.get("halted") or "integrity error"
            alerts.append(_alert("DragentStreamHalted", "critical", f"{s.get('task')}: {why}"))
        elif s.get("state") == "retrying":
            why = s.get("last_error") or "error"
            alerts.append(_alert("DragentStreamRetrying", "warning", f"{s.get('task')}: {why}"))
    for stream, job in sorted(verifications.items()):
        if job.get("state") == "failed":
            alerts.append(
                _alert("DragentVerificationFailed", "warning", f"{stream}: {job.get('error')}")
            )
        elif job.get("ok") is False:
            alerts.append(
                _alert(
                    "DragentVerificationMismatch",
                    "critical",
                    f"{stream}: {job.get('differences')} difference(s) — {job.get('summary')}",
                )
            )
    order = {"critical": 0, "warning": 1}
    return sorted(alerts, key=lambda a: order.get(a["severity"], 2))


def peer_summary(metrics_text: str) -> dict[str, Any]:
    """Role and epoch from a peer agent's /metrics text. Raises ``ValueError`` if the
    text is not Prometheus exposition format or names no role."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "dragent_role" and sample.value == 1:
                out["role"] = sample.labels.get("role")
            elif sample.name == "dragent_epoch":
                out["epoch"] = int(sample.value)
    if "role" not in out:
        raise ValueError("no dragent_role in the peer's metrics")
    return out


def _alert(name: str, severity: str, summary: str) -> dict[str, str]:
    return {"alert": name, "severity": severity, "summary": summary}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dragent status</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1b1f24;background:#fafbfc}
h1{font-size:1.3rem;margin:0 0 .3rem}h2{font-size:1.05rem;margin:1.4rem 0 .4rem}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{border-bottom:1px solid #e1e4e8;padding:.35rem .5rem;text-align:left;font-size:.9rem}
th{background:#f3f4f6}.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#116329}.bad{color:#b42318;font-weight:600}.warn{color:#9a6700}
.badge{display:inline-block;padding:.05rem .5rem;border-radius:1rem;background:#e1e4e8}
.active{background:#d1f0d9}.passive{background:#dbe7ff}
#error{color:#b42318}svg{vertical-align:middle}
</style></head>
<body>
<h1>dragent <span id="region">…</span> <span id="role" class="badge">…</span></h1>
<div>epoch <span id="epoch">?</span> · generation <span id="generation">?</span> ·
up <span id="uptime">?</span> · updated <span id="updated">never</span>
<span id="error"></span></div>
<div>cost this month: <span id="cost">…</span></div>
<h2>Regions</h2>
<table><thead><tr><th>region</th><th>role</th><th>epoch</th><th>agent</th><th>checked</th>
</tr></thead><tbody id="regions"></tbody></table>
<h2>Open alerts</h2>
<ul id="alerts"><li>loading…</li></ul>
<h2>Streams</h2>
<table><thead><tr><th>stream</th><th>side</th><th>state</th><th>captured</th><th>durable</th>
<th>applied</th><th>verified</th><th>RPO / lag</th><th>target</th><th>last 5 min</th>
</tr></thead><tbody id="streams"></tbody></table>
<h2>Verifications</h2>
<table><thead><tr><th>stream</th><th>state</th><th>result</th><th>finished</th><th>report</th>
</tr></thead><tbody id="verifications"></tbody></table>
<h2 id="group-title" hidden>Group</h2>
<table id="group-table" hidden><thead><tr><th>partition</th><th>owner</th></tr></thead>
<tbody id="group"></tbody></table>
<h2>Drills</h2>
<table><thead><tr><th>drill</th><th>last success</th></tr></thead>
<tbody id="drills"></tbody></table>
<script>
"use strict";
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const headers = token ? {Authorization: "Bearer " + token} : {};
const $ = (id) => document.getElementById(id);
function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text; if (cls) td.className = cls; row.appendChild(td); return td;
}
function ago(t) {
  if (!t) return "never";
  const s = Date.now() / 1000 - t;
  return s < 90 ? s.toFixed(0) + " s ago" : s < 5400 ? (s / 60).toFixed(0) + " min ago"
       : new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}
function mark(m) { return m ? String(m.position) : "–"; }
function spark(points, target) {
  const ns = "http://www.w3.org/2000/svg", w = 120, h = 24;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h);
  svg.setAttribute("class", "spark");
  if (!points || points.length < 2) return svg;
  const t0 = points[0][0], t1 = points[points.length - 1][0];
  const top = Math.max(target || 0, ...points.map((p) => p[1])) || 1;
  const xy = points.map((p) => [(p[0] - t0) / ((t1 - t0) || 1) * w, h - p[1] / top * (h - 2) - 1]);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", xy.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" "));
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#0969da");
  svg.appendChild(line);
  if (target) {  // the RPO target as a dashed line
    const y = (h - target / top * (h - 2) - 1).toFixed(1);
    const goal = document.createElementNS(ns, "line");
    for (const [k, v] of [["x1", 0], ["x2", w], ["y1", y], ["y2", y], ["stroke", "#b42318"],
                          ["stroke-dasharray", "3 2"]]) goal.setAttribute(k, v);
    svg.appendChild(goal);
  }
  svg.setAttribute("data-points", String(points.length));
  return svg;
}
function render(s) {
  $("region").textContent = s.region; $("role").textContent = s.role;
  $("role").className = "badge " + s.role;
  $("epoch").textContent = s.epoch; $("generation").textContent = s.generation;
  $("uptime").textContent = s.uptime_seconds.toFixed(0) + " s";
  $("updated").textContent = new Date().toISOString().slice(11, 19) + " UTC";
  const c = s.cost || {};  // agent/costlog.py: this month's samples scaled to a month
  $("cost").textContent = c.error ? "unknown: " + c.error
    : c.monthly == null ? "–"
    : "about " + c.currency + " " + c.monthly.toFixed(2) + " a month (estimate for " + c.month
      + " from " + (c.seconds / 3600).toFixed(1) + " h of counters, S3 prices " + c.prices
      + "; dragent report cost for the detail)";
  const regions = $("regions"); regions.replaceChildren();
  const here = {region: s.region + " (this agent)", role: s.role, epoch: s.epoch,
                url: location.origin, reachable: true};
  for (const p of [here, ...(s.peers || [])]) {
    const r = document.createElement("tr"); r.dataset.region = p.region;
    cell(r, p.region);
    cell(r, p.reachable ? p.role : "unreachable (" + p.error + ")", p.reachable ? "" : "bad");
    cell(r, p.epoch == null ? "–" : String(p.epoch)); cell(r, p.url);
    cell(r, p.checked_at ? ago(p.checked_at) : "now"); regions.appendChild(r);
  }
  const alerts = $("alerts"); alerts.replaceChildren();
  for (const a of s.alerts || []) {
    const li = document.createElement("li");
    li.className = a.severity === "critical" ? "bad" : "warn";
    li.textContent = a.alert + ": " + a.summary; alerts.appendChild(li);
  }
  if (!alerts.children.length) alerts.innerHTML = '<li class="ok">none</li>';
  const rows = $("streams"); rows.replaceChildren();
  for (const st of s.streams) {
    const r = document.createElement("tr"); r.dataset.task = st.task;
    cell(r, st.task); cell(r, st.side);
    cell(r, st.state, st.state === "running" ? "ok" : "bad");
    for (const w of ["captured", "durable", "applied", "verified"]) cell(r, mark(st[w]), "num");
    const v = st.rpo_seconds != null ? st.rpo_seconds : st.apply_lag_seconds;
    const over = st.rpo_seconds != null && st.rpo_seconds > st.rpo_target_seconds;
    cell(r, v == null ? "–" : v.toFixed(2) + " s", "num rpo " + (over ? "bad" : "ok"));
    cell(r, st.rpo_target_seconds + " s", "num");
    cell(r, "").appendChild(spark((s.rpo_history || {})[st.task], st.rpo_target_seconds));
    rows.appendChild(r);
  }
  const vs = $("verifications"); vs.replaceChildren();
  for (const [stream, j] of Object.entries(s.verifications || {})) {
    const r = document.createElement("tr"); r.dataset.stream = stream;
    cell(r, stream); cell(r, j.state);
    cell(r, j.ok === true ? "match" : j.ok === false ? "MISMATCH" : (j.error || "–"),
         j.ok === true ? "ok" : "bad");
    cell(r, ago(j.finished_at));
    const a = document.createElement("a"); a.href = "#"; a.textContent = j.id;
    a.onclick = (e) => { e.preventDefault(); openReport(j.id); };
    cell(r, "").appendChild(a); vs.appendChild(r);
  }
  if (!vs.children.length) vs.innerHTML = '<tr><td colspan="5">none yet</td></tr>';
  const g = s.group, gs = $("group"); gs.replaceChildren();  // agent.group: who runs what
  $("group-title").hidden = $("group-table").hidden = !g;
  if (g) {
    $("group-title").textContent = "Group: " + g.members.length + " members, this one "
      + g.instance + (g.fenced ? " (FENCED: runs nothing)" : "");
    for (const [part, who] of Object.entries(g.owners)) {
      const r = document.createElement("tr"); r.dataset.partition = part;
      cell(r, part); cell(r, who, who === g.instance ? "ok" : ""); gs.appendChild(r);
    }
  }
  const ds = $("drills"); ds.replaceChildren();
  for (const [name, t] of Object.entries(s.drills || {})) {
    const r = document.createElement("tr"); cell(r, name); cell(r, ago(t)); ds.appendChild(r);
  }
  if (!ds.children.length) ds.innerHTML = '<tr><td colspan="2">none recorded</td></tr>';
}
async function openReport(id) {
  const resp = await fetch("/api/v1/reports/" + id, {headers: {...headers, Accept: "text/html"}});
  const url = URL.createObjectURL(new Blob([await resp.text()], {type: "text/html"}));
  window.open(url, "_blank");
}
async function poll() {
  try {
    const resp = await fetch("/status", {headers, cache: "no-store"});
    if (!resp.ok) throw new Error("/status answered " + resp.status);
    render(await resp.json()); $("error").textContent = "";
  } catch (e) { $("error").textContent = " · " + e.message; }
  setTimeout(poll, 2000);
}
poll();
</script>
</body></html>
"""
