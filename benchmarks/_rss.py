"""A process's own peak memory, as benchmarks report it."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak RSS in MB: ``VmHWM``, the high-water mark of its own address
    space. Not ``ru_maxrss``: Linux carries that over an exec from the process that forked
    this one, so a child of a large benchmark process reported its parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
