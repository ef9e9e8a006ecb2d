"""``dragent lab``: bring the lab up or down, show it, break it.

Subcommands: ``up [--netns] [--regions 2|3]``, ``down [--purge]``, ``status [--json]``,
``fault REGION SERVICE ACTION``, ``fault partition X Y`` and
``fault heal [X [Y]]`` (no member: every link); each takes ``--dir`` (default
``$DRAGENT_LAB_DIR`` or ``./.lab``) and ``--slot``. ``up --netns`` (as root)
puts each member in a network namespace of its own, which partitions need;
the lab remembers its mode. ``up --regions 3`` adds region c (a second passive
region: PostgreSQL, SeaweedFS, an etcd member); the lab remembers its count.
Exit status: 0 on success, 1 when the lab reports an error, 2 for bad usage
(both printed to stderr).
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

from agent.lab.lab import Lab
from agent.lab.members import ALL_REGIONS, REGION_COUNTS, Action, Service
from agent.lab.processes import LabError

Command = Callable[[argparse.Namespace], int]


def register(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the ``lab`` command and its subcommands to a ``dragent`` subparsers object;
    return the lab's own subparsers (``agent.chaos.cli`` adds ``lab chaos`` there)."""
    lab = sub.add_parser(
        "lab",
        help="run regions a and b (and c) and a witness on this machine, with real servers",
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
    up.add_argument(
        "--netns",
        action="store_true",
        help="each member in its own network namespace, so links can be cut (root)",
    )
    up.add_argument(
        "--regions",
        type=int,
        choices=REGION_COUNTS,
        default=None,
        help="how many regions: 2 (a, b; the default) or 3 (a, b, c); kept by the lab",
    )
    up.set_defaults(func=cmd_up)
    down = commands.add_parser("down", parents=[common], help="stop every server of the lab")
    down.add_argument("--purge", action="store_true", help="also delete the lab's files")
    down.set_defaults(func=cmd_down)
    status = commands.add_parser("status", parents=[common], help="show every server's state")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=cmd_status)
    fault = commands.add_parser(
        "fault",
        parents=[common],
        help="break or repair a service, cut or restore a link",
        usage=f"%(prog)s {FAULT_USAGE}",
    )
    fault.add_argument("words", nargs="+", metavar="ARG", help=FAULT_USAGE)
    fault.set_defaults(func=cmd_fault)
    return commands


def _lab(args: argparse.Namespace) -> Lab:
    root = args.dir or Path(os.environ.get("DRAGENT_LAB_DIR") or ".lab")
    return Lab(
        root,
        slot=args.slot,
        network="netns" if getattr(args, "netns", False) else None,
        regions=getattr(args, "regions", None),
    )


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
    for region in lab.regions:
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
    words = list(args.words)
    if words[0] in ("partition", "heal"):
        return _link_fault(args, words)
    problem = _service_fault_problem(words)
    if problem:
        print(
            f"dragent lab fault: {problem}\nusage: dragent lab fault {FAULT_USAGE}", file=sys.stderr
        )
        return 2
    region, service, action = words
    asyncio.run(_lab(args).fault(region, service, action))  # type: ignore[arg-type]
    print(f"{action} {service} in {region}: done")
    return 0


FAULT_USAGE = "REGION SERVICE ACTION | partition X Y | heal [X [Y]]"


def _service_fault_problem(words: list[str]) -> str | None:
    if len(words) != 3:
        return f"expected REGION SERVICE ACTION, got {' '.join(words)!r}"
    for word, name, choices in zip(
        words,
        ("region", "service", "action"),
        ((*ALL_REGIONS, "witness"), get_args(Service), get_args(Action)),
        strict=True,
    ):
        if word not in choices:
            return f"unknown {name} {word!r}: expected one of {', '.join(choices)}"
    return None


def _link_fault(args: argparse.Namespace, words: list[str]) -> int:
    verb, members = words[0], words[1:]
    if (verb == "partition" and len(members) != 2) or len(members) > 2:
        usage = "partition X Y" if verb == "partition" else "heal [X [Y]]"
        print(f"dragent lab fault: usage: dragent lab fault {usage}", file=sys.stderr)
        return 2
    lab = _lab(args)
    if verb == "partition":
        lab.partition(members[0], members[1])
        print(f"link {members[0]}-{members[1]}: cut")
    else:
        lab.heal(*members)
        print(f"links {'-'.join(members) if members else 'all'}: healed")
    print(f"cut links: {_pairs(lab.partitions())}")
    return 0


def _pairs(pairs: list[tuple[str, str]] | list[list[str]]) -> str:
    return ", ".join(f"{x}-{y}" for x, y in pairs) or "none"


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
    head = f"lab {status['root']} (slot {status['slot']})"
    if status.get("network") == "netns":
        members = ", ".join(
            f"{m} {p['address']} ({p['namespace']})" for m, p in status["members"].items()
        )
        head += f"\nnetwork netns: {members}\ncut links: {_pairs(status['partitions'])}"
    return head + "\n" + "\n".join(lines)
