"""The loop watch: a loop blocked by a synchronous call is reported from another thread,
with the stack it is blocked in, once, and its end with how long it lasted."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from agent.loopwatch import LoopWatch
from replicators import logs


def blocking_call_in_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # what a synchronous driver or a stuck child would do


async def test_a_blocked_loop_is_reported_with_its_stack(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("json", "info")
    watch = LoopWatch(after=0.3, every=0.05)
    watch.start()
    try:
        await asyncio.sleep(0.3)  # a loop that turns is not reported
        assert watch.stalls == 0
        blocking_call_in_the_loop(1.0)
        await asyncio.sleep(0.3)
    finally:
        watch.stop()
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    blocked = [e for e in events if e["event"] == "event loop blocked"]
    assert watch.stalls == 1 and len(blocked) == 1, events
    assert "blocking_call_in_the_loop" in blocked[0]["stack"]
    again = [e for e in events if e["event"] == "event loop runs again"]
    assert len(again) == 1 and 0.8 <= again[0]["blocked_seconds"] <= 1.5, again
    assert 0.8 <= watch.longest <= 1.5
