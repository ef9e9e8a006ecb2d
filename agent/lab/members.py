"""Who is in the lab and what can be done to them: the regions, the members (the regions
and the witness), the kinds of server each region runs, the actions of ``fault``."""

from __future__ import annotations

from typing import Literal, get_args

from agent.lab.agent import AgentServer
from agent.lab.processes import Server

REGIONS = ("a", "b")
MEMBERS = ("a", "b", "witness")
Kind = Literal["postgres", "s3", "etcd"]
Service = Literal["postgres", "s3", "etcd", "agent", "all"]
Action = Literal["kill", "stop", "start", "restart", "pause", "resume"]
KINDS: tuple[Kind, ...] = get_args(Kind)
VAULT_BUCKET = "dragent-vault"
DATA_BUCKET = "data"
STATE_VERSION = 1


def _never_ran(server: Server) -> bool:
    """An agent with neither a process nor a pid file: ``"all"`` leaves it alone."""
    return isinstance(server, AgentServer) and not server.pid_file.exists()
