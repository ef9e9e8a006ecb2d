"""``dragent restore KIND ...``: one command, a subcommand per stream kind.

Each kind's CLI module calls ``kind_parser(sub, KIND, help)`` and adds its own
arguments to the parser it gets back, so no kind depends on another's options.
"""

from __future__ import annotations

import argparse

_KINDS: dict[int, argparse._SubParsersAction] = {}


def kind_parser(sub: argparse._SubParsersAction, kind: str, what: str) -> argparse.ArgumentParser:
    """The ``restore <kind>`` parser, creating ``restore`` itself on first use."""
    if id(sub) not in _KINDS:
        restore = sub.add_parser("restore", help="point-in-time restore from this region's vault")
        _KINDS[id(sub)] = restore.add_subparsers(dest="kind", required=True, metavar="KIND")
    return _KINDS[id(sub)].add_parser(kind, help=what)
