"""The baselines the benchmarks compare against, and a loud failure when one is missing.

A benchmark names its baselines up front with ``require``: a missing binary stops it
before anything runs (exit status 2, naming the Debian package and the script that
installs it), so a comparison never silently loses a row.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

# binary -> Debian package; deploy/lab/install-system-deps.sh installs every one
PACKAGES = {
    "restic": "restic",
    "rclone": "rclone",
    "pgbackrest": "pgbackrest",
    "pg_receivewal": "postgresql-15",
}
PG_BIN = Path("/usr/lib/postgresql/15/bin")


class MissingBaseline(SystemExit):
    """A baseline binary is not installed (a ``SystemExit`` with status 2)."""


def find(binary: str) -> str | None:
    """The path of ``binary`` on PATH (or PostgreSQL 15's bin directory), else None."""
    found = shutil.which(binary)
    if found is None and (PG_BIN / binary).exists():
        found = str(PG_BIN / binary)
    return found


def require(*binaries: str) -> None:
    """Exit loudly (status 2) unless every baseline binary is installed."""
    missing = [b for b in binaries if find(b) is None]
    if not missing:
        return
    packages = " ".join(sorted({PACKAGES.get(b, b) for b in missing}))
    message = (
        f"missing baseline: {', '.join(missing)} (Debian: apt-get install -y {packages}; "
        "deploy/lab/install-system-deps.sh installs every baseline). "
        "A benchmark does not run without its baselines."
    )
    print(message, file=sys.stderr)
    raise MissingBaseline(2)
