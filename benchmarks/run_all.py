"""Run every benchmark in benchmarks/ and write one dated results file.

Usage: ``python benchmarks/run_all.py [--only NAME ...] [--skip NAME ...]
[--args NAME="--seconds 30"] [--quick] [--timeout SECONDS] [--note TEXT]
[--out STEM] [--json]``

One convention for every benchmark: ``--json`` prints its figures as JSON on
stdout (and its human table on stderr). Each ``benchmarks/<name>.py`` with a
main block runs in its own process with ``--json``; its stderr (the table,
progress, warnings) goes to ``benchmarks/results/<name>.log``. One benchmark
failing does not stop the others; the exit code is 1 if any failed.

The run is written to ``benchmarks/results/<date>-<machine>.json`` (every
benchmark's full JSON, its arguments, exit status and wall time, and the
machine: CPUs, load averages, the processes that were using CPU while it ran,
and ``--note``) and ``<date>-<machine>.md`` (a headline table, then each
benchmark's own table). ``<date>`` is the UTC date and ``<machine>`` the host
name; ``--out`` names another stem. Figures quoted in the README come from one
such file, committed with the text that quotes it. One SVG chart per
side-by-side comparison goes next to it (``<stem>-<name>-<n>.svg``, not
committed). ``--json`` prints the whole run as JSON on stdout instead of the
headline table. ``--quick`` uses each benchmark's small sizes (``QUICK``),
which ``--args`` overrides.
"""

from __future__ import annotations

import argparse
import datetime
import html
import importlib
import json
import os
import platform
import re
import shlex
import socket
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
# small sizes for a run that fits in about 20 minutes on two busy cores (``--quick``)
QUICK = {
    "pipeline": ["--mib", "16", "--stream-mib", "64", "--rounds", "3"],
    "objects": ["--objects", "300", "--latency-objects", "60", "--merkle-keys", "100000"],
    "artifacts": ["--size-mib", "128", "--rounds", "1"],
    "rpo_postgres": ["--seconds", "150", "--rate", "100"],
    "failover": ["--trials", "1"],
    "sync": ["--seconds", "5"],
    "longevity": ["--history-seconds", "10", "--writes", "4000", "--restores", "5", "--scale", "5"],
    "scale": ["--objects", "300", "--merkle-keys", "100000"],
    "merkle_scale": ["--keys", "100000"],
    "s3_request_cpu": ["--requests", "200", "--rounds", "3"],
    "s3_open_cpu": ["--stores", "10", "--rounds", "3"],
}


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


def busy_processes(limit: int = 8) -> list[str]:
    """The processes using the most CPU right now, but this run's (``ps``)."""
    try:
        done = subprocess.run(
            ["ps", "-eo", "pid,ppid,pcpu,etimes,args", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    ours = {os.getpid()}
    out = []
    for line in done.stdout.splitlines():
        fields = line.split(None, 4)
        if len(fields) < 5 or int(fields[0]) in ours or int(fields[1]) in ours:
            continue
        if float(fields[2]) < 5.0:
            break
        out.append(f"{fields[2]}% {fields[4][:160]}")
        if len(out) == limit:
            break
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": socket.gethostname().split(".")[0],
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def parse_stdout(stdout: str) -> Any:
    """The JSON a benchmark printed on stdout (the last JSON document if other lines
    came before it)."""
    text = stdout.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    at = text.rfind("\n{")
    while at != -1:
        try:
            return json.loads(text[at + 1 :])
        except ValueError:
            at = text.rfind("\n{", 0, at)
    return None


def run_one(name: str, extra: list[str], within: float) -> dict[str, Any]:
    """Run one benchmark with ``--json``; return its status, wall time, figures and the
    load and busy processes around it."""
    script = HERE / f"{name}.py"
    argv = [sys.executable, str(script), *extra, "--json"]
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load_before, busy = os.getloadavg(), busy_processes()
    started = time.monotonic()
    log = RESULTS / f"{name}.log"
    try:
        with open(log, "w") as err:
            done = subprocess.run(
                argv, stdout=subprocess.PIPE, stderr=err, text=True, timeout=within
            )
        code, stdout = done.returncode, done.stdout
    except subprocess.TimeoutExpired as e:
        code, stdout = -1, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else ""
    seconds = round(time.monotonic() - started, 1)
    figures = parse_stdout(stdout) if code == 0 else None
    if code == 0 and figures is None:
        code = 3  # exited 0 but printed no JSON: a broken benchmark, not a result
    if code != 0:
        with open(log, "a") as f:
            f.write(stdout)
    return {
        "name": name,
        "exit": code,
        "started_at": started_at,
        "seconds": seconds,
        "argv": [str(Path(argv[1]).relative_to(HERE.parent)), *argv[2:]],
        "load_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "busy_at_start": busy,
        "results": figures,
    }


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


def write_charts(runs: list[dict[str, Any]], stem: str) -> list[str]:
    """One SVG per side-by-side group of each benchmark; returns the file names."""
    names = []
    for r in runs:
        for i, (path, group) in enumerate(comparisons(r["results"])):
            name = f"{stem}-{r['name']}-{i}.svg"
            (RESULTS / name).write_text(svg_chart(f"{r['name']}: {path}", group))
            names.append(name)
    return names


def status(run: dict[str, Any]) -> str:
    code = run["exit"]
    if code == 0:
        return "ok"
    return {-1: "timeout", 2: "missing baseline", 3: "no JSON"}.get(code, f"exit {code}")


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| benchmark | status | wall s | figure | value |",
        "| --- | --- | ---: | --- | ---: |",
    ]
    for r in runs:
        figures = headline(r["results"]) or {"(no JSON)": float("nan")}
        for i, (k, v) in enumerate(figures.items()):
            head = (r["name"], status(r), f"{r['seconds']:g}") if i == 0 else ("", "", "")
            lines.append(f"| {head[0]} | {head[1]} | {head[2]} | {k} | {v:.4g} |")
    return "\n".join(lines)


def own_table(run: dict[str, Any]) -> str:
    """The benchmark's own table (its module's ``table(results)``), or its log's tail."""
    if run["results"] is not None:
        try:
            module = importlib.import_module(f"benchmarks.{run['name']}")
            return str(module.table(run["results"]))
        except Exception as e:  # a table that cannot render must not lose the run
            return f"(table not rendered: {e!r})"
    try:
        return "\n".join((RESULTS / f"{run['name']}.log").read_text().splitlines()[-15:])
    except OSError:
        return "(no output)"


def markdown(run: dict[str, Any], charts: list[str]) -> str:
    m = run["machine"]
    out = [
        f"# Benchmarks {run['date']} on {m['host']}",
        "",
        f"`{run['command']}`, started {run['started_at']}, {run['seconds']:g} s in all.",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}.",
    ]
    if run["note"]:
        out += ["", f"Also running: {run['note']}"]
    out += ["", "## Headline figures", "", table(run["runs"]), ""]
    for r in run["runs"]:
        load = " → ".join(f"{x:g}" for x in r["load_1m"])
        out += [
            f"## {r['name']} ({status(r)}, {r['seconds']:g} s)",
            "",
            f"`{shlex.join(r['argv'])}`; load average (1 min) {load}",
            "",
        ]
        if r["busy_at_start"]:
            out += ["Other processes using CPU when it started:", ""]
            out += [f"- `{p}`" for p in r["busy_at_start"]] + [""]
        out += ["```", own_table(r), "```", ""]
    if charts:
        out += ["Charts (next to this file, not committed): " + ", ".join(charts), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--only", nargs="*", default=[], help="run only these benchmarks")
    parser.add_argument("--skip", nargs="*", default=[], help="do not run these")
    parser.add_argument(
        "--args", action="append", default=[], help='extra arguments: NAME="--seconds 30"'
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (QUICK)")
    parser.add_argument("--timeout", type=float, default=900.0, help="per benchmark, seconds")
    parser.add_argument("--note", default="", help="what else was running on the machine")
    parser.add_argument("--out", help="results file stem (default <date>-<machine>)")
    parser.add_argument("--json", action="store_true", help="print the whole run as JSON")
    args = parser.parse_args(argv)
    extra: dict[str, list[str]] = dict(QUICK) if args.quick else {}
    for item in args.args:
        name, _, rest = item.partition("=")
        extra[name] = shlex.split(rest)
    names = [n for n in benchmarks() if (not args.only or n in args.only) and n not in args.skip]
    RESULTS.mkdir(exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    info = machine()
    stem = args.out or f"{now:%Y-%m-%d}-{info['host']}"
    started = time.monotonic()
    runs = []
    for name in names:
        print(f"running {name}…", file=sys.stderr, flush=True)
        runs.append(run_one(name, extra.get(name, []), args.timeout))
    run = {
        "date": f"{now:%Y-%m-%d}",
        "started_at": now.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "command": " ".join(
            ["benchmarks/run_all.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": info,
        "note": args.note,
        "runs": runs,
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
    charts = write_charts(runs, stem)
    (RESULTS / f"{stem}.md").write_text(markdown(run, charts))
    print(f"wrote benchmarks/results/{stem}.json and .md", file=sys.stderr)
    if args.json:
        json.dump(run, sys.stdout, indent=2, default=str)
        print()
    else:
        print(table(runs))
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
