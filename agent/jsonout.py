"""JSON on stdout, as every ``--json`` of the CLI prints it (sorted keys, indented)."""

from __future__ import annotations

import json
import sys


def print_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
