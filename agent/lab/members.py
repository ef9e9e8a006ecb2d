"""Who is in the lab and what can be done to them: the regions, the members (the regions
and the witness), the kinds of server each region runs, the actions of ``fault``."""

from __future__ import annotations

from typing import Literal, get_args

from agent.lab.agent import AgentServer
from agent.lab.processes import Server

REGIONS = ("a", "b")
MEMBERS = ("a", "b", "witness")
ALL_REGIONS = ("a", "b", "c")
"""Every region a lab can run: the first ``regions`` of them (2, the default, or 3)."""
REGION_COUNTS = (2, 3)
Kind = Literal["postgres", "s3", "etcd"]
Service = Literal["postgres", "s3", "etcd", "agent", "all"]
Action = Literal["kill", "stop", "start", "restart", "pause", "resume"]
KINDS: tuple[Kind, ...] = get_args(Kind)
VAULT_BUCKET = "dragent-vault"
DATA_BUCKET = "data"
STATE_VERSION = 1


def lab_regions(count: int) -> tuple[str, ...]:
    """The regions of a lab of ``count`` regions ("a", "b"[, "c"])."""
    if count not in REGION_COUNTS:
        raise ValueError(f"a lab runs {' or '.join(map(str, REGION_COUNTS))} regions, not {count}")
    return ALL_REGIONS[:count]


def lab_members(count: int) -> tuple[str, ...]:
    """The etcd members of a lab of ``count`` regions: its regions and the witness."""
    return (*lab_regions(count), "witness")


def _never_ran(server: Server) -> bool:
    """An agent with neither a process nor a pid file: ``"all"`` leaves it alone."""
    return isinstance(server, AgentServer) and not server.pid_file.exists()
