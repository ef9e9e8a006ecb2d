"""The chaos timeline: one self-contained HTML page of a run (no script, no external files).

Pure: `render` turns the history and its verdict into a string. Every string
taken from the history or verdict goes through `esc`, so a hostile fault detail
or client name cannot inject markup.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

Event = dict[str, Any]

WIDTH, LEFT, RIGHT, LANE, RPO_HEIGHT = 1100, 130, 20, 26, 110
ROLE_COLOURS = {"active": "#2e7d32", "passive": "#78909c"}
FENCED, OTHER = "#e57373", "#cfd8dc"
REGION_LINES = ("#1565c0", "#ef6c00", "#6a1b9a", "#00838f")

CSS = """
body{font:14px system-ui,sans-serif;margin:16px;color:#222}
h1{margin:0 0 8px}.ok{color:#2e7d32}.failed{color:#c62828}
table{border-collapse:collapse;margin:8px 0 16px}
td,th{padding:2px 10px;text-align:left;border-bottom:1px solid #eee}
svg text{font:11px system-ui,sans-serif}
"""


def esc(value: Any) -> str:
    """``value`` as text safe in HTML content and in quoted attributes."""
    return html.escape(str(value), quote=True)


@dataclass(frozen=True)
class Scale:
    """Maps history times (wall-clock s) to x pixels across the plot."""

    t0: float
    t1: float

    def x(self, t: float) -> float:
        """The x pixel of time ``t``."""
        span = max(self.t1 - self.t0, 1e-9)
        return LEFT + (WIDTH - LEFT - RIGHT) * (t - self.t0) / span


def of_type(events: list[Event], kind: str) -> list[Event]:
    """The events of ``kind``, in history order."""
    return [e for e in events if e["type"] == kind]


def regions_of(events: list[Event]) -> list[str]:
    """Every region named by a state, rpo or acknowledged write event, sorted."""
    named = {e.get("region") for e in events if e["type"] in ("state", "rpo", "write")}
    return sorted(str(r) for r in named if r is not None)


def label(x: float, y: float, text: Any, anchor: str = "start", fill: str = "#222") -> str:
    """An escaped SVG text element."""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}">{esc(text)}</text>'


def bar(x0: float, x1: float, y: float, fill: str, title: str, text: str = "") -> str:
    """A lane bar from x0 to x1 with a hover title and its label inside (or after it, dark)."""
    width = max(x1 - x0, 1.0)
    fits = width > 7 * len(text)
    inner = label(x0 + 3, y + 15, text, fill="#fff") if fits else label(x1 + 3, y + 15, text)
    return (
        f'<g><title>{esc(title)}</title><rect x="{x0:.1f}" y="{y + 2}" width="{width:.1f}" '
        f'height="{LANE - 4}" fill="{fill}" rx="2"/>{inner if text else ""}</g>'
    )


def axis(scale: Scale, y: float, bottom: float) -> str:
    """Gridlines with seconds-from-start labels, about ten of them."""
    span = scale.t1 - scale.t0
    step = next((s for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600) if span / s <= 12), 1200)
    parts = []
    for k in range(int(span // step) + 1):
        x = scale.x(scale.t0 + k * step)
        parts.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{bottom}" stroke="#eee"/>')
        parts.append(label(x, y - 4, f"{k * step}s", anchor="middle", fill="#666"))
    return "".join(parts)


def state_colour(state: Event) -> str:
    """Fenced red, else the role's colour."""
    return FENCED if state.get("fenced") else ROLE_COLOURS.get(str(state.get("role")), OTHER)


def region_colour(regions: list[str], region: str) -> str:
    """The colour of ``region``'s label and RPO line."""
    return REGION_LINES[regions.index(region) % len(REGION_LINES)] if region in regions else "#000"


def region_lane(
    events: list[Event], regions: list[str], region: str, scale: Scale, y: float
) -> str:
    """One region's role/epoch/fenced bars: each state lasts until the region's next one."""
    states = [s for s in of_type(events, "state") if s.get("region") == region]
    parts = [label(8, y + 17, f"region {region}", fill=region_colour(regions, region))]
    ends = [s["t"] for s in states[1:]] + [scale.t1] if states else []
    for state, end in zip(states, ends, strict=True):
        fenced = " fenced" if state.get("fenced") else ""
        text = f"{state.get('role')} e{state.get('epoch')}{fenced}"
        title = f"{region}: {text} from {state['t'] - scale.t0:.1f}s"
        parts.append(bar(scale.x(state["t"]), scale.x(end), y, state_colour(state), title, text))
    return "".join(parts)


def healed_by(open_faults: list[Event], heal: Event) -> list[Event]:
    """The open faults ``heal`` ends: the oldest of its fault and target, or all for "all"."""
    if heal["fault"] == "all":
        return list(open_faults)
    key = (heal["fault"], heal.get("target"))
    return [f for f in open_faults if (f["fault"], f.get("target")) == key][:1]


def fault_spans(events: list[Event], end: float) -> list[tuple[Event, float]]:
    """Each fault with the time of the heal that ended it (``end`` when none did)."""
    open_faults: list[Event] = []
    spans: dict[int, float] = {}
    for e in events:
        if e["type"] == "fault":
            open_faults.append(e)
        elif e["type"] == "heal":
            for fault in healed_by(open_faults, e):
                open_faults.remove(fault)
                spans[id(fault)] = e["t"]
    return [(f, spans.get(id(f), end)) for f in of_type(events, "fault")]


def fault_lane(events: list[Event], scale: Scale, y: float) -> str:
    """The nemesis lane: one bar per fault, from injection to heal."""
    parts = [label(8, y + 17, "faults")]
    for fault, healed in fault_spans(events, scale.t1):
        text = f"{fault['fault']} {fault.get('target', '')}"
        title = f"{text} {fault.get('detail') or ''} ({healed - fault['t']:.1f}s)"
        parts.append(bar(scale.x(fault["t"]), scale.x(healed), y, "#8d6e63", title, text))
    return "".join(parts)


def rpo_chart(events: list[Event], regions: list[str], scale: Scale, y: float) -> str:
    """The reported RPO of every (region, stream) as a polyline, coloured by region."""
    samples = [e for e in of_type(events, "rpo") if e.get("rpo") is not None]
    top = max([float(e["rpo"]) for e in samples] + [1.0])
    parts = [label(8, y + 14, "RPO reported"), label(8, y + 28, f"top {top:.1f}s", fill="#666")]
    lines: dict[tuple[str, str], list[str]] = {}
    for e in samples:
        py = y + RPO_HEIGHT - (RPO_HEIGHT - 6) * float(e["rpo"]) / top
        lines.setdefault((str(e.get("region")), str(e.get("stream"))), []).append(
            f"{scale.x(e['t']):.1f},{py:.1f}"
        )
    for (region, stream), points in lines.items():
        colour = region_colour(regions, region)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" '
            f'points="{" ".join(points)}"><title>{esc(region)} {esc(stream)}</title></polyline>'
        )
    base = y + RPO_HEIGHT
    parts.append(f'<line x1="{LEFT}" y1="{base}" x2="{WIDTH - RIGHT}" y2="{base}" stroke="#999"/>')
    return "".join(parts)


def client_lane(events: list[Event], client: str, lost: set[Any], scale: Scale, y: float) -> str:
    """One client's acknowledged writes as ticks, the lost ones as tall red marks."""
    parts = [label(8, y + 17, f"client {client}")]
    for w in of_type(events, "write"):
        if w.get("client") != client or not w.get("ok"):
            continue
        x = scale.x(w["t"])
        if w.get("id") in lost:
            what = f"lost write {w.get('id')} ({w.get('region')} e{w.get('epoch')})"
            parts.append(
                f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + LANE}" stroke="#c62828" '
                f'stroke-width="2"><title>{esc(what)}</title></line>'
            )
        else:
            parts.append(
                f'<line x1="{x:.1f}" y1="{y + 8}" x2="{x:.1f}" y2="{y + LANE - 8}" stroke="#555"/>'
            )
    return "".join(parts)


def summary_rows(verdict: dict[str, Any], start: Event | None) -> dict[str, str]:
    """The verdict's counts as label -> text."""
    writes, rpo = verdict.get("writes", {}), verdict.get("rpo", {})
    run = f"seed {start.get('seed')}, {start.get('minutes')} min" if start else "?"
    faults = verdict.get("faults", {}).items()
    return {
        "run": run + (f", sync {start.get('sync')}" if start else ""),
        "writes": f"{writes.get('acknowledged', 0)} acknowledged, {writes.get('failed', 0)} failed",
        "lost": f"{len(verdict.get('lost', []))} (ok: {verdict.get('lost_ok')})",
        "split brain": f"{len(verdict.get('split_brain', []))} "
        f"(ok: {verdict.get('split_brain_ok')})",
        "mirror / vault": f"{verdict.get('mirror_ok')} / {verdict.get('vault_ok')}",
        "rpo": f"reported max {rpo.get('reported_max', 0):.2f}s, "
        f"true max {rpo.get('true_max', 0):.2f}s, "
        f"under-reported {len(rpo.get('under_reported', []))}",
        "rto max": f"{verdict.get('rto_max', 0):.2f}s",
        "faults": ", ".join(f"{name} {n}" for name, n in faults) or "none",
    }


def summary(verdict: dict[str, Any], start: Event | None) -> str:
    """The verdict at the top of the page: OK or FAILED, and its counts."""
    rows = summary_rows(verdict, start).items()
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    word, css = ("OK", "ok") if verdict.get("ok") else ("FAILED", "failed")
    return f'<h1>Chaos run: <span class="{css}">{word}</span></h1><table>{body}</table>'


def render(events: list[Event], verdict: dict[str, Any]) -> str:
    """The whole page: the verdict, then faults, regions, RPO and client writes on one time axis."""
    start = next((e for e in events if e["type"] == "start"), None)
    times = [e["t"] for e in events] or [0.0]
    scale = Scale(min(times), max(times))
    regions = regions_of(events)
    clients = sorted({str(w.get("client")) for w in of_type(events, "write")})
    lost = {loss.get("id") for loss in verdict.get("lost", [])}
    y, lanes = 30.0, []
    lanes.append(fault_lane(events, scale, y))
    for region in regions:
        y += LANE + 6
        lanes.append(region_lane(events, regions, region, scale, y))
    y += LANE + 10
    lanes.append(rpo_chart(events, regions, scale, y))
    y += RPO_HEIGHT + 10
    for client in clients:
        lanes.append(client_lane(events, client, lost, scale, y))
        y += LANE + 4
    height = y + 10
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0f}">'
        f"{axis(scale, 24, height)}{''.join(lanes)}</svg>"
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>chaos timeline</title>'
        f"<style>{CSS}</style></head><body>{summary(verdict, start)}{svg}</body></html>\n"
    )
