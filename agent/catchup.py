"""The passive region's last apply before it promotes: the coordinator's ``catch_up`` hook.

Once the epoch is ours the old region can ship nothing more, so every segment
already in this region's vault is all there will be. ``drain_sinks`` returns
once each sink has polled the vault *after* the call began and found nothing
new — everything was applied (WAL into the standby's spool, objects into the
mirror, model versions into the model store) — and names the LSN the local
standby must replay before it may be promoted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from agent.coordination.takeover import until
from agent.supervise import StreamTask
from replicators.postgres.lsn import format_lsn

STOPPED = ("halted", "stopped")


def drained(sinks: Sequence[StreamTask], since: float) -> bool:
    """Every sink found the vault empty after ``since`` (a halted sink is not waited for:
    the takeover records it and promotes with what was applied)."""
    return all(t.idle_at > since or t.state in STOPPED for t in sinks)


def replay_target(sinks: Sequence[StreamTask]) -> str | None:
    """The applied end of the region's one ``postgres`` stream, as an LSN (None: no such
    stream, nothing applied yet, or several — their LSNs belong to different clusters)."""
    marks = [
        t.progress.marks["applied"].position
        for t in sinks
        if t.progress.kind == "postgres" and "applied" in t.progress.marks
    ]
    return format_lsn(marks[0]) if len(marks) == 1 else None


async def drain_sinks(tasks: Callable[[], Sequence[StreamTask]]) -> str | None:
    """Wait until ``drained``, then return ``replay_target`` (the caller bounds the wait)."""
    since = time.time()

    def sinks() -> list[StreamTask]:
        return [t for t in tasks() if t.progress.side == "sink"]

    for t in sinks():
        t.nudge.set()  # a quiet sink lists again now, not after its idle wait

    async def done() -> bool:
        return drained(sinks(), since)

    await until(done)
    return replay_target(sinks())
