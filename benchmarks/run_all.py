"""Run every benchmark in benchmarks/ and print one summary table.

Usage: ``python benchmarks/run_all.py [--only NAME ...] [--skip NAME ...]
[--args NAME="--seconds 30"] [--timeout SECONDS] [--json]``

Each ``benchmarks/<name>.py`` (but this file) runs in its own process with
its JSON output switched on: benchmarks whose ``--json`` takes a file get
``benchmarks/results/<name>.json``; those whose ``--json`` is a flag print
JSON on stdout (and write the same file themselves). Their own tables go to
``benchmarks/results/<name>.log``. One benchmark failing does not stop the
others; the exit code is 1 if any failed.

The summary (``benchmarks/results/summary.json`` and ``summary.md``) lists,
per benchmark, its exit status, wall time and its headline figures: every
numeric result whose name says it is a percentile, a median, a maximum, a
ratio or a rate; and one SVG chart (``benchmarks/results/<name>-<n>.svg``)
per side-by-side comparison a benchmark reports (a table whose entries, such
as ``ours`` and ``rclone``, share figures). ``--json`` prints the summary as
JSON instead of the table.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
HEADLINE = re.compile(
    r"(^|[._])(p50|p99|median|max|ratio|mbps|mb_per_s|per_s|rto|rpo|seconds)([._]|$)"
)
MAX_FIGURES = 14


def benchmarks() -> list[str]:
    """Every runnable benchmark: a script of this directory with a ``__main__`` block
    (helpers such as ``dirstore.py`` and ``_baseline.py`` are not benchmarks)."""
    return sorted(
        p.stem
        for p in HERE.glob("*.py")
        if p.stem != "run_all"
        and not p.stem.startswith("_")
        and 'if __name__ == "__main__":' in p.read_text()
    )


def json_takes_a_file(script: Path) -> bool:
    """True if the script's ``--json`` option takes a value (``--json FILE``)."""
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60
    )
    return bool(re.search(r"--json [A-Z_]+", done.stdout))


def run_one(name: str, extra: list[str], within: float) -> dict[str, Any]:
    """Run one benchmark; return its status, wall time and parsed JSON (or None)."""
    script = HERE / f"{name}.py"
    out_file = RESULTS / f"{name}.json"
    to_file = json_takes_a_file(script)
    argv = [sys.executable, str(script), *extra]
    argv += ["--json", str(out_file)] if to_file else ["--json"]
    started = time.monotonic()
    log = RESULTS / f"{name}.log"
    try:
        with open(log, "w") as err:
            done = subprocess.run(
                argv, stdout=subprocess.PIPE, stderr=err, text=True, timeout=within
            )
        code, stdout = done.returncode, done.stdout
    except subprocess.TimeoutExpired:
        code, stdout = -1, ""
    seconds = round(time.monotonic() - started, 1)
    figures = _load(stdout if not to_file else None, out_file, code)
    if to_file or code != 0:
        with open(log, "a") as f:
            f.write(stdout)
    return {"name": name, "exit": code, "seconds": seconds, "argv": argv[1:], "results": figures}


def _load(stdout: str | None, out_file: Path, code: int) -> Any:
    if code != 0:
        return None
    if stdout:
        try:
            return json.loads(stdout)
        except ValueError:
            pass
    try:
        return json.loads(out_file.read_text())
    except (OSError, ValueError):
        return None


def flatten(value: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested JSON as ``a.b.c`` paths (list items by their ``name``)."""
    out: dict[str, float] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            label = v.get("name", i) if isinstance(v, dict) else i
            out.update(flatten(v, f"{prefix}[{label}]"))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        out[prefix] = float(value)
    return out


def headline(results: Any) -> dict[str, float]:
    figures = {k: v for k, v in flatten(results).items() if HEADLINE.search(k.lower())}
    return dict(list(figures.items())[:MAX_FIGURES])


def comparisons(value: Any, path: str = "") -> list[tuple[str, dict[str, dict[str, float]]]]:
    """Side-by-side groups: a table whose entries (``ours``, ``rclone``...) are tables
    sharing numeric figures; returns ``(path, {figure: {entry: value}})`` per group."""
    found: list[tuple[str, dict[str, dict[str, float]]]] = []
    if not isinstance(value, dict):
        return found
    entries = {
        k: {f: float(x) for f, x in v.items() if isinstance(x, int | float)}
        for k, v in value.items()
        if isinstance(v, dict)
    }
    entries = {k: v for k, v in entries.items() if v}
    seen: set[frozenset[str]] = set()
    for anchor in entries.values():
        cluster = frozenset(k for k, v in entries.items() if len(set(v) & set(anchor)) >= 2)
        if len(cluster) < 2 or cluster in seen:
            continue
        seen.add(cluster)
        shared = sorted(set.intersection(*(set(entries[k]) for k in cluster)))
        group = {f: {k: entries[k][f] for k in sorted(cluster)} for f in shared}
        found.append((path or "results", group))
    for k, v in value.items():
        found += comparisons(v, f"{path}.{k}" if path else str(k))
    return found


def svg_chart(title: str, group: dict[str, dict[str, float]]) -> str:
    """Grouped horizontal bars, one group per figure, each figure on its own scale."""
    entries = sorted({e for values in group.values() for e in values})
    colors = ["#0969da", "#bf8700", "#1a7f37", "#8250df", "#cf222e"]
    bar, gap, label_w, width = 14, 10, 260, 640
    rows = sum(len(v) for v in group.values())
    height = 40 + rows * bar + len(group) * gap + 20 * len(entries)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="4" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
    ]
    y = 30
    for figure, values in group.items():
        top = max(abs(v) for v in values.values()) or 1.0
        out.append(f'<text x="4" y="{y + bar - 3}">{html.escape(figure)}</text>')
        for entry, v in sorted(values.items()):
            w = (width - label_w - 80) * abs(v) / top
            color = colors[entries.index(entry) % len(colors)]
            out.append(
                f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar - 2}" fill="{color}"/>'
                f'<text x="{label_w + w + 4:.1f}" y="{y + bar - 3}">{v:.4g}</text>'
            )
            y += bar
        y += gap
    for i, entry in enumerate(entries):
        color = colors[i % len(colors)]
        out.append(
            f'<rect x="4" y="{y + 20 * i}" width="10" height="10" fill="{color}"/>'
            f'<text x="18" y="{y + 20 * i + 9}">{html.escape(entry)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)


def write_charts(runs: list[dict[str, Any]]) -> list[str]:
    """One SVG per side-by-side group of each benchmark; returns the file names."""
    names = []
    for r in runs:
        for i, (path, group) in enumerate(comparisons(r["results"])):
            name = f"{r['name']}-{i}.svg"
            (RESULTS / name).write_text(svg_chart(f"{r['name']}: {path}", group))
            names.append(name)
    return names


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| benchmark | status | wall s | figure | value |",
        "| --- | --- | ---: | --- | ---: |",
    ]
    for r in runs:
        status = "ok" if r["exit"] == 0 else ("timeout" if r["exit"] == -1 else f"exit {r['exit']}")
        figures = headline(r["results"]) or {"(no JSON)": float("nan")}
        for i, (k, v) in enumerate(figures.items()):
            head = (r["name"], status, f"{r['seconds']:g}") if i == 0 else ("", "", "")
            lines.append(f"| {head[0]} | {head[1]} | {head[2]} | {k} | {v:.4g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--only", nargs="*", default=[], help="run only these benchmarks")
    parser.add_argument("--skip", nargs="*", default=[], help="do not run these")
    parser.add_argument(
        "--args", action="append", default=[], help='extra arguments: NAME="--seconds 30"'
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="per benchmark, seconds")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    extra: dict[str, list[str]] = {}
    for item in args.args:
        name, _, rest = item.partition("=")
        extra[name] = shlex.split(rest)
    names = [n for n in benchmarks() if (not args.only or n in args.only) and n not in args.skip]
    RESULTS.mkdir(exist_ok=True)
    runs = []
    for name in names:
        print(f"running {name}…", file=sys.stderr, flush=True)
        runs.append(run_one(name, extra.get(name, []), args.timeout))
    summary = {"finished_at": time.time(), "runs": runs}
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    charts = write_charts(runs)
    images = "".join(f"\n![{c}]({c})\n" for c in charts)
    (RESULTS / "summary.md").write_text("# Benchmarks\n\n" + table(runs) + "\n" + images)
    if args.json:
        json.dump(summary, sys.stdout, indent=2, default=str)
        print()
    else:
        print(table(runs))
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
