"""The benchmarks' one output convention: with ``--json`` the figures as JSON on stdout
and the table on stderr; without it, the table on stdout."""

from __future__ import annotations

import json
import sys
from typing import Any


def emit(result: dict[str, Any], table: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        print(table, file=sys.stderr)
    else:
        print(table)
