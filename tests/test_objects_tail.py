"""The filer subscription's child process dies with the agent, even by kill -9, and is
started without Python code between fork and exec (see ``tail._with_death_signal``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from replicators.objects.tail import _with_death_signal

CHILD = """
import subprocess, sys, time
from replicators.objects.tail import _with_death_signal
proc = subprocess.Popen(_with_death_signal(["sleep", "60"]))
print(proc.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_tail_child_dies_when_the_agent_is_killed() -> None:
    argv = _with_death_signal(["weed", "filer.meta.tail"])
    assert argv[1:4] == ["--pdeathsig", "KILL", "--"] and argv[4:] == ["weed", "filer.meta.tail"]
    agent = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert agent.stdout is not None
    tail = int(agent.stdout.readline())
    assert _alive(tail)
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()
    deadline = time.monotonic() + 5
    while _alive(tail) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(tail), "the tail's child outlived the agent"
