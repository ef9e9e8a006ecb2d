"""Inline SVG charts for reports (pure; no scripts, no external resources).

Two shapes are enough for a compliance report: a time series against a
target line (RPO per stream) and bars against a target (drill RTOs). Every
data point is an element carrying its values (``data-t``/``data-v`` or
``data-label``/``data-v``) and a ``<title>`` tooltip, so the chart can be
read by a person and checked by a machine. A few dozen lines of SVG do not
warrant a charting dependency whose output would need scripts or a CDN.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from html import escape

W, H = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 28, 36
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")


def _fmt_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _num(v: float) -> str:
    return f"{v:.6g}"


def _scale(lo: float, hi: float, a: float, b: float) -> tuple[float, float]:
    """(factor, offset) mapping [lo, hi] onto [a, b]."""
    span = hi - lo or 1.0
    k = (b - a) / span
    return k, a - lo * k


def _frame(name: str, title: str, y_max: float, y_unit: str) -> list[str]:
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-chart="{escape(name)}" '
        f'viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="{LEFT}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
        f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="#444"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="#444"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        y = H - BOTTOM - frac * (H - TOP - BOTTOM)
        label = f"{_num(y_max * frac)}{y_unit}"
        out.append(f'<text x="{LEFT - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                   f"{escape(label)}</text>")  # fmt: skip
    return out


def _target_line(y: float, target: float, unit: str) -> str:
    return (
        f'<line class="target" data-v="{target!r}" x1="{LEFT}" y1="{y:.1f}" '
        f'x2="{W - RIGHT}" y2="{y:.1f}" stroke="#d62728" stroke-dasharray="6 4"/>'
        f'<text x="{W - RIGHT}" y="{y - 4:.1f}" font-size="10" text-anchor="end" '
        f'fill="#d62728">target {_num(target)}{unit}</text>'
    )


def time_series(
    name: str,
    title: str,
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    target: float | None = None,
    unit: str = "s",
    span: tuple[float, float] | None = None,
) -> str:
    """A line chart of ``series`` ({label: [(unix time, value)]}) with an optional target."""
    points = [p for pts in series.values() for p in pts]
    times = [t for t, _ in points] or [0.0, 1.0]
    t0, t1 = span or (min(times), max(times))
    y_max = max([v for _, v in points] + [target or 0.0, 1e-9]) * 1.15
    kx, bx = _scale(t0, t1, LEFT, W - RIGHT)
    ky, by = _scale(0.0, y_max, H - BOTTOM, TOP)
    out = _frame(name, title, y_max, unit)
    out.append(f'<text x="{LEFT}" y="{H - 8}" font-size="10">{_fmt_time(t0)}</text>')
    out.append(f'<text x="{W - RIGHT}" y="{H - 8}" font-size="10" text-anchor="end">'
               f"{_fmt_time(t1)} UTC</text>")  # fmt: skip
    if target is not None:
        out.append(_target_line(ky * target + by, target, unit))
    for i, (label, pts) in enumerate(sorted(series.items())):
        color = COLORS[i % len(COLORS)]
        xy = [(kx * t + bx, ky * v + by, t, v) for t, v in sorted(pts)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in xy)
        out.append(f'<g class="series" data-series="{escape(label)}">')
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for x, y, t, v in xy:
            over = target is not None and v > target
            fill = "#d62728" if over else color
            out.append(
                f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{fill}" '
                f'data-t="{t!r}" data-v="{v!r}"><title>{escape(label)} '
                f"{_fmt_time(t)}: {_num(v)}{unit}</title></circle>"
            )
        out.append("</g>")
    if not points:
        out.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text>')
    out.append("</svg>")
    return "\n".join(out)


def bars(
    name: str,
    title: str,
    items: Sequence[tuple[str, float, bool]],
    *,
    target: float | None = None,
    unit: str = "s",
) -> str:
    """A bar chart of ``items`` ([(label, value, ok)]) with an optional target line."""
    y_max = max([v for _, v, _ in items] + [target or 0.0, 1e-9]) * 1.15
    ky, by = _scale(0.0, y_max, H - BOTTOM, TOP)
    out = _frame(name, title, y_max, unit)
    slot = (W - LEFT - RIGHT) / max(len(items), 1)
    for i, (label, value, ok) in enumerate(items):
        x, y = LEFT + i * slot + slot * 0.15, ky * value + by
        fill = "#2ca02c" if ok else "#d62728"
        out.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" '
            f'height="{H - BOTTOM - y:.1f}" fill="{fill}" data-label="{escape(label)}" '
            f'data-v="{value!r}"><title>{escape(label)}: {_num(value)}{unit}</title></rect>'
        )
        if len(items) <= 12:
            out.append(f'<text x="{x + slot * 0.35:.1f}" y="{H - BOTTOM + 12}" font-size="9" '
                       f'text-anchor="middle">{escape(label[-11:])}</text>')  # fmt: skip
    if target is not None:
        out.append(_target_line(ky * target + by, target, unit))
    if not items:
        out.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text>')
    out.append("</svg>")
    return "\n".join(out)
