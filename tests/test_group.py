"""Several agents per region sharing a partitioned objects stream through etcd (agent.group).

Real processes, real etcd, real SeaweedFS: three agents in region a ship the partitions
they own, three in region b apply them, while a writer churns the bucket. One agent of a
is killed with kill -9 mid-stream; a fourth joins under load. The mirror must end equal
to the source, each object at its newest version.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from agent.agentproc import AgentProcess
from agent.group.assign import assignment
from agent.lab import Lab
from replicators.bucket import Bucket, find_weed_binary
from replicators.errors import NotFound
from replicators.partitions import partition_of, partitions
from tests.support import eventually
from tests.test_objects_kill import _newest_versions_won, churn
from tests.test_objects_rig import filer_address, options, s3, same
from verifiers.objects import verify_buckets

pytestmark = pytest.mark.lab
PARTS = 8
TTL = 6.0


def config(lab: Lab, region: str, workdir: Path, stream: str, prefix: str) -> Path:
    data = tomllib.loads(lab.config_path(region).read_text())
    data["data_dir"] = str(workdir / region)
    data["etcd"]["prefix"] = f"/dragent-{stream}"  # this test's own group keys
    data["group"] = {"enabled": True, "member_ttl": TTL}
    data["scrub"] = {"enabled": False}
    objects: dict[str, Any] = {
        "source": s3(lab, "a", prefix),
        "mirror": s3(lab, "b", prefix),
        "events": "filer",
        "filer": {"filer": filer_address(lab, "a"), "weed": find_weed_binary()},
        "scan_interval": "5s",
        "inline_max": "1MiB",
        "delete_guard": {"enabled": False},  # the churn deletes ~15 % of the keys
    }
    data["streams"] = [
        {
            "name": stream,
            "kind": "objects",
            "segment_max_age": "200ms",
            "partitions": PARTS,
            "objects": objects,
        }
    ]
    path = workdir / f"{region}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def spread_name(base: str) -> str:
    """A stream name (``base`` and a suffix) whose partitions spread over every member at
    each stage of the test: rendezvous loads vary (8 partitions over 3 members leave one
    with none about one time in eight), and the test needs each member to own some."""

    def loads(members: list[str]) -> list[int]:
        won = collections.Counter(
            assignment([p.name for p in partitions(name, PARTS)], members).values()
        )
        return [won[m] for m in members]

    for i in range(1000):
        name = f"{base[:50]}-{i}"
        stages = (["a-1", "a-2", "a-3"], ["a-1", "a-3", "a-4"], ["b-1", "b-2", "b-3"])
        if all(min(loads(m)) >= 2 for m in stages):
            return name
    raise AssertionError("no name spreads the partitions")


def _part(key: str) -> int:
    return partition_of(key, PARTS)


async def all_in(bucket: Bucket, keys: list[str]) -> bool:
    for key in keys:
        try:
            await bucket.head(key)
        except NotFound:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def member(cfg: Path, workdir: Path, name: str) -> AgentProcess:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    args = ["--instance", name, "--listen", listen]
    log, pid = workdir / f"{name}.log", workdir / f"{name}.pid"
    return AgentProcess(cfg, log, pid, f"http://{listen}", args)


async def owned(agents: list[AgentProcess]) -> dict[str, str]:
    """partition -> the member whose /status says it runs it (live members only)."""
    out: dict[str, str] = {}
    for a in agents:
        status = await a.status() if a.running else None
        group = (status or {}).get("group") or {}
        for part in group.get("owned", []):
            assert part not in out, f"{part} owned by {out[part]} and {group['instance']}"
            out[part] = group["instance"]
    return out


async def group_of(agent: AgentProcess) -> dict[str, Any]:
    """The member's ``group`` status (asked again while a loaded agent does not answer)."""
    for _ in range(20):
        status = await agent.status()
        if status is not None:
            return dict(status["group"])
        await asyncio.sleep(0.5)
    raise AssertionError(f"{agent.args} does not answer /status")


async def balanced(agents: list[AgentProcess], names: set[str]) -> bool:
    """Every partition owned, every member owning some (the loads are bounded)."""
    now = await owned(agents)
    return set(now) == names and len(set(now.values())) == len(agents)


class Gaps:
    """Watches the members' /status; the longest time some partition had no owner."""

    def __init__(self, agents: list[AgentProcess], names: set[str]) -> None:
        self.agents, self.names = agents, names
        self.longest = 0.0
        self._since: float | None = None

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            if set(await owned(self.agents)) == self.names:
                self._since = None
            else:
                self._since = self._since or now
                self.longest = max(self.longest, now - self._since)
            await asyncio.sleep(0.2)


async def test_three_members_share_a_stream_kill_one_add_one(
    lab: Lab, tmp_path: Path, unique: str
) -> None:
    unique = spread_name(unique)
    prefix = f"{unique}/"
    cfg_a = config(lab, "a", tmp_path, unique, prefix)
    cfg_b = config(lab, "b", tmp_path, unique, prefix)
    senders = [member(cfg_a, tmp_path, f"a-{i}") for i in (1, 2, 3)]
    sinks = [member(cfg_b, tmp_path, f"b-{i}") for i in (1, 2, 3)]
    names = {p.name for p in partitions(unique, PARTS)}
    opts = options(lab, prefix)
    src, dst = await Bucket.open(opts.source), await Bucket.open(opts.mirror)
    keys = [f"k/{i:05d}" for i in range(240)]
    large = ["large/0"]
    everyone = senders + sinks
    late = member(cfg_a, tmp_path, "a-4")  # joins under load, below
    try:
        for a in everyone:
            await a.start()
        for a in everyone:
            await a.wait_ready(within=60)
        await eventually(lambda: balanced(senders, names), within=60, every=0.2)
        await eventually(lambda: balanced(sinks, names), within=60, every=0.2)
        spread = await owned(senders)

        # markers in a-2's partitions, in the mirror before it dies and deleted at the source
        # while their partitions have no owner: only the partitions' logs tell a new owner
        # that they were shipped (replicators.objects.handover)
        lost = {p for p, who in spread.items() if who == "a-2"}
        indexes = {p: int(p.rsplit("-of-", 1)[0].rsplit("--p", 1)[1]) for p in lost}
        markers = [
            k for k in (f"marker/{i:04d}" for i in range(400)) if _part(k) in indexes.values()
        ][:12]
        for key in markers:
            await src.write(key, b"shipped by a-2", "text/plain", {})
        await eventually(lambda: all_in(dst, markers), within=60, every=0.5)
        writer = asyncio.create_task(churn(src, keys, large, rounds=4, seed=7))
        await asyncio.sleep(3.0)
        victim = senders[1]
        killed_at = time.time()
        await victim.kill()  # kill -9 mid-stream
        for key in markers:
            await src.delete(key)
        survivors = [senders[0], senders[2]]

        async def taken() -> bool:
            return lost <= set(await owned(survivors))

        await eventually(taken, within=4 * TTL, every=0.2)
        takes = [
            h["taken_at"]
            for a in survivors
            for h in (await group_of(a))["handovers"]
            if h["partition"] in lost
        ]
        reassigned = max(takes) - killed_at
        # its lease expires at most one TTL after its last renewal (before the kill); a
        # survivor's next cycle (every TTL/6) takes the partitions
        assert 0 < reassigned <= TTL + TTL / 6 + 0.5, f"reassigned after {reassigned:.2f} s"

        gaps = Gaps([*survivors, late], names)
        watching = asyncio.create_task(gaps.run())
        await late.start()
        await late.wait_ready(within=60)

        async def late_owns() -> bool:
            return "a-4" in set((await owned([*survivors, late])).values())

        try:
            await eventually(late_owns, within=4 * TTL, every=0.2)
        except BaseException:
            for a in [*survivors, late]:
                print(a.args, ((await a.status()) or {}).get("group"))
            raise
        await asyncio.sleep(2 * TTL)  # the handovers settle
        watching.cancel()
        assert gaps.longest < TTL, f"a partition had no owner for {gaps.longest:.1f} s"
        await writer

        await eventually(lambda: same(src, dst), within=240, every=3)
        report = await verify_buckets(unique, opts, deep=True)
        assert report["ok"] and report["roots"]["source"] == report["roots"]["mirror"]
        await _newest_versions_won(src, dst)
        assert not any([await all_in(dst, [k]) for k in markers]), "a delete was lost"
        print(f"reassigned in {reassigned:.2f} s; longest unowned gap {gaps.longest:.2f} s")
    finally:
        for a in [*senders, late, *sinks]:
            await a.stop(grace=10)
        await src.aclose()
        await dst.aclose()
