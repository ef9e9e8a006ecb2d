"""``dragent lab chaos``: a seeded nemesis, a workload and a checker on a netns lab.

A subcommand of ``dragent lab``, added by the top-level CLI (the lab does not
depend on the chaos that runs on it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path


def register(lab_commands: argparse._SubParsersAction) -> None:
    """Add ``chaos`` to the ``lab`` command's subparsers."""
    commands = lab_commands
    chaos = commands.add_parser(
        "chaos", help="a seeded nemesis, a workload and a checker on a netns lab (root)"
    )
    chaos.add_argument("--minutes", type=float, default=3.0, help="length of the faults phase")
    chaos.add_argument("--seed", type=int, default=1, help="the schedule's seed")
    chaos.add_argument(
        "--faults", default=None, help="comma-separated kinds (default: all; see docs/chaos.md)"
    )
    chaos.add_argument("--sync", action="store_true", help="zero-loss mode: no write may be lost")
    chaos.add_argument("--dir", type=Path, default=Path(".lab-chaos"), help="work directory")
    chaos.add_argument("--json", action="store_true", help="print the verdict as JSON")
    chaos.set_defaults(func=cmd_chaos)


def cmd_chaos(args: argparse.Namespace) -> int:
    from agent.chaos.faults import TARGETS
    from agent.chaos.run import DEFAULT_FAULTS, chaos

    faults = tuple(args.faults.split(",")) if args.faults else DEFAULT_FAULTS
    unknown = [f for f in faults if f not in TARGETS]
    if unknown:
        print(f"dragent lab chaos: unknown faults {unknown}: expected {sorted(TARGETS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    root = args.dir.resolve()
    out = root / f"run-{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    verdict = asyncio.run(
        chaos(root, out, minutes=args.minutes, seed=args.seed, faults=faults, sync=args.sync)
    )
    if args.json:
        print(json.dumps(verdict, indent=2, sort_keys=True))
    else:
        lost = verdict.get("lost", [])
        print(f"verdict: {'ok' if verdict['ok'] else 'FAILED'}; {len(lost)} writes lost; "
              f"split brain: {len(verdict.get('split_brain', []))}; files in {out}")  # fmt: skip
    return 0 if verdict["ok"] else 1
