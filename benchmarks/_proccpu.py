"""CPU time of other processes (``/proc/<pid>/stat``): the agents a benchmark starts and
the lab's servers, whose CPU shares this machine's cores with the process timed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system seconds of ``pid`` (every thread); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def pid_file_cpu(pid_file: Path) -> float | None:
    """CPU seconds so far of the process named in ``pid_file`` (None: no such file)."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return cpu_seconds(pid)


def s3_servers_cpu(lab: Any, regions: tuple[str, ...] = ("a", "b")) -> float:
    """CPU seconds so far of the lab's S3 servers (SeaweedFS) of ``regions``."""
    return sum(pid_file_cpu(lab.region_dir(r) / "s3" / "weed.pid") or 0.0 for r in regions)
