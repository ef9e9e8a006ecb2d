"""``dragent lab``: bring the lab up or down, show it, break it.

Subcommands: ``up``, ``down [--purge]``, ``status [--json]``,
``fault REGION SERVICE ACTION``; each takes ``--dir`` (default
``$DRAGENT_LAB_DIR`` or ``./.lab``) and ``--slot``. Exit status: 0 on success,
1 when the lab reports an error (printed to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from agent.lab.lab import MEMBERS, REGIONS, Action, Lab, Service
from agent.lab.processes import LabError

Command = Callable[[argparse.Namespace], int]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``lab`` command and its subcommands to a ``dragent`` subparsers object."""
    lab = sub.add_parser(
        "lab",
        help="run regions a and b and a witness on this machine, with real servers",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    commands = lab.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir", type=Path, default=None, help="lab directory (default: $DRAGENT_LAB_DIR or ./.lab)"
    )
    common.add_argument(
        "--slot", type=int, default=None, help="port block to use (default: the first free one)"
    )
    up = commands.add_parser("up", parents=[common], help="start the lab (idempotent)")
    up.set_defaults(func=cmd_up)
    down = commands.add_parser("down", parents=[common], help="stop every server of the lab")
    down.add_argument("--purge", action="store_true", help="also delete the lab's files")
    down.set_defaults(func=cmd_down)
    status = commands.add_parser("status", parents=[common], help="show every server's state")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=cmd_status)
    fault = commands.add_parser("fault", parents=[common], help="break or repair a service")
    fault.add_argument("region", choices=MEMBERS)
    fault.add_argument("service", choices=get_args(Service))
    fault.add_argument("action", choices=get_args(Action))
    fault.set_defaults(func=cmd_fault)


def _lab(args: argparse.Namespace) -> Lab:
    root = args.dir or Path(os.environ.get("DRAGENT_LAB_DIR") or ".lab")
    return Lab(root, slot=args.slot)


def _reports_errors(command: Command) -> Command:
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except LabError as exc:
            print(f"dragent lab {args.lab_command}: {exc}", file=sys.stderr)
            return 1

    return run


@_reports_errors
def cmd_up(args: argparse.Namespace) -> int:
    lab = _lab(args)
    started = time.monotonic()
    asyncio.run(lab.up())
    print(format_status(lab.status()))
    for region in REGIONS:
        print(f"agent config {region}: {lab.config_path(region)}")
    print(f"lab up at {lab.root} (slot {lab.slot}) in {time.monotonic() - started:.1f}s")
    return 0


@_reports_errors
def cmd_down(args: argparse.Namespace) -> int:
    lab = _lab(args)
    if not lab.exists:
        print(f"no lab at {lab.root}")
        return 0
    asyncio.run(lab.down(purge=args.purge))
    print(f"lab at {lab.root} {'purged' if args.purge else 'stopped'}")
    return 0


@_reports_errors
def cmd_status(args: argparse.Namespace) -> int:
    status = _lab(args).status()
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


@_reports_errors
def cmd_fault(args: argparse.Namespace) -> int:
    lab = _lab(args)
    asyncio.run(lab.fault(args.region, args.service, args.action))
    print(f"{args.action} {args.service} in {args.region}: done")
    return 0


def format_status(status: dict[str, Any]) -> str:
    """A table of ``Lab.status()``: one row per member and service."""
    header = ("WHERE", "SERVICE", "STATE", "PID", "PORT", "ENDPOINT")
    rows = [header]
    for where, services in status["regions"].items():
        for service, s in services.items():
            pid = str(s["pid"]) if s["pid"] else "-"
            rows.append((where, service, s["state"], pid, str(s["port"]), s["endpoint"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows
    ]
    return f"lab {status['root']} (slot {status['slot']})\n" + "\n".join(lines)
