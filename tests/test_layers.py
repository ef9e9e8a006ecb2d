"""The layers hold: ``lint-imports`` checks the contracts in pyproject.toml (the core
imports neither the agent nor a stream kind, the kinds are independent of each other,
the product never imports the lab or the chaos runs,
no package has an import cycle among its modules)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and done.stdout.count("KEPT") == 5, done.stdout
