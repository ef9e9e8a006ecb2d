"""Cold copy by ``dragent run`` processes, as deployed: ``members`` agents per region.

With one member per region the agents run without a group (today's deployment); with
more, every agent of a region joins the region's group (``[group] enabled``) and the
stream is cut into ``partitions`` (``docs/groups.md``). Time: from starting the agents
until the mirror lists every object, and from the first object listed in the mirror
to the last (start-up left out: processes, group membership, partitions taken). CPU:
user + system time of every agent process (both regions, ``/proc/<pid>/stat``) over
each of those spans. Then, with two or more members,
one member of region a is killed with kill -9 and the time until the others run its
partitions is measured from their ``/status`` (the take's wall time).
"""

from __future__ import annotations

import asyncio
import socket
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from agent.agentproc import AgentProcess
from agent.lab import Lab
from benchmarks._proccpu import cpu_seconds, s3_servers_cpu
from benchmarks.objects import options, s3
from replicators.bucket import Bucket

MEMBER_TTL = 6.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(
    lab: Lab, region: str, prefix: str, name: str, workdir: Path, members: int, partitions: int
) -> Path:
    data = tomllib.loads(lab.config_path(region).read_text())
    data["data_dir"] = str(workdir / region)
    data["scrub"] = {"enabled": False}
    objects = {
        "source": s3(lab, "a", prefix),
        "mirror": s3(lab, "b", f"{name}/"),  # each run its own prefix of the mirror
        "events": "none",
        "scan_interval": 600,
        "inline_max": "1MiB",
        "delete_guard": {"enabled": False},
    }
    stream: dict[str, Any] = {"name": name, "kind": "objects", "objects": objects}
    if members > 1:
        data["group"] = {"enabled": True, "member_ttl": MEMBER_TTL}
        data["etcd"]["prefix"] = f"/dragent-bench-{name}"
        stream["partitions"] = partitions
    data["streams"] = [stream]
    path = workdir / f"{region}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


def _cpu_of(agents: dict[str, AgentProcess]) -> float:
    return sum(cpu_seconds(a.proc.pid) for a in agents.values() if a.proc)


async def _listed(bucket: Bucket) -> int:
    n = 0
    async for page in bucket.scan():
        n += len(page)
    return n


async def agents_cold_copy(
    lab: Lab, prefix: str, objects: int, workdir: Path, members: int, partitions: int = 0
) -> dict[str, Any]:
    """Start ``members`` agents in region a and in b, wait until the mirror lists
    ``objects`` keys; the wall time, the agents' CPU, the lab's S3 servers' CPU over the
    same time, and (members > 1) the time to reassign a killed member's partitions.
    ``partitions``: the stream's, with more than one member (0: four per member)."""
    name = f"{prefix.strip('/')}-m{members}"  # the stream, and the mirror's prefix
    agents: dict[str, AgentProcess] = {}
    for region in ("a", "b"):
        cfg = _config(lab, region, prefix, name, workdir, members, partitions or 4 * members)
        for i in range(1, members + 1):
            listen = f"127.0.0.1:{_free_port()}"
            args = ["--listen", listen] + (["--instance", f"{region}-{i}"] if members > 1 else [])
            log, pid = workdir / f"{region}-{i}.log", workdir / f"{region}-{i}.pid"
            agents[f"{region}-{i}"] = AgentProcess(cfg, log, pid, f"http://{listen}", args)
    mirror_opts = options(lab, f"{name}/", events=False)
    mirror = await Bucket.open(mirror_opts.mirror)
    out: dict[str, Any] = {"members": members, "agents": len(agents)}
    if members > 1:
        out["partitions"] = partitions or 4 * members
    try:
        started, servers0 = time.monotonic(), s3_servers_cpu(lab)
        for agent in agents.values():
            await agent.start()
        first: tuple[float, float, float] | None = None
        while (n := await _listed(mirror)) < objects:
            if any(not a.running for a in agents.values()):
                raise RuntimeError("an agent exited: " + str(workdir))
            if n and first is None:
                first = (time.monotonic(), _cpu_of(agents), s3_servers_cpu(lab))
            await asyncio.sleep(0.25)
        done = time.monotonic()
        out["seconds"] = done - started
        out["cpu_seconds"] = _cpu_of(agents)
        out["servers_cpu_seconds"] = round(s3_servers_cpu(lab) - servers0, 2)
        if first is not None:  # start-up left out: from the first object in the mirror
            out["copy_seconds"] = round(done - first[0], 2)
            out["copy_cpu_seconds"] = round(out["cpu_seconds"] - first[1], 2)
            out["copy_servers_cpu_seconds"] = round(s3_servers_cpu(lab) - first[2], 2)
            out["startup_seconds"] = round(first[0] - started, 2)
            out["copy_objects_per_cpu_s"] = round(objects / max(out["copy_cpu_seconds"], 0.01), 1)
        if members > 1:
            out["reassign_seconds"] = await _reassign(list(agents.values())[:members])
            out["member_ttl_seconds"] = MEMBER_TTL
    finally:
        for agent in agents.values():
            await agent.stop(grace=15)
        await mirror.aclose()
    return out


async def _group(agent: AgentProcess) -> dict[str, Any]:
    for _ in range(40):
        status = await agent.status()
        if status is not None and status.get("group"):
            return dict(status["group"])
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{agent.args}: no group status")


async def _reassign(region_a: list[AgentProcess]) -> float:
    """kill -9 the first member; seconds until the others have taken all it ran."""
    victim, others = region_a[0], region_a[1:]
    lost = set((await _group(victim))["owned"])
    killed = time.time()
    await victim.kill()
    deadline = time.monotonic() + 10 * MEMBER_TTL
    while time.monotonic() < deadline:
        takes: dict[str, float] = {}
        for agent in others:
            for h in (await _group(agent))["handovers"]:
                if h["partition"] in lost and h["taken_at"] >= killed:
                    takes[h["partition"]] = min(h["taken_at"], takes.get(h["partition"], 1e18))
        if set(takes) == lost:
            return max(takes.values()) - killed
        await asyncio.sleep(0.5)
    raise RuntimeError("the killed member's partitions were not taken")
