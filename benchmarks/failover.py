"""Failover benchmark: RTO and RPO over kill trials, each phase timed.

Usage: ``python benchmarks/failover.py [--trials 5] [--baseline-ttl 6] [--json]
[--no-native]``

Brings up a lab (real etcd with three members, PostgreSQL, SeaweedFS, BIND).
Each trial: region b's standby following region a, both regions' coordinators
running, a client writing a row every 20 ms to region a; then region a is
killed whole (agent or coordinator, PostgreSQL, S3, etcd member) and the clock
runs until region b took a write under the new epoch and the DNS name resolves
to b. Region a is restarted between trials.

The headline row, **vault-fed standby**, is production's shape: both agents
run as daemons (``dragent run``) with a ``postgres`` stream and failover
enabled; a base backup is taken with ``dragent backup postgres``; region a's
agent ships its WAL into b's vault, b's agent rebuilds the WAL spool from the
vault, and b's standby, built by ``dragent standby init``, replays it through
``dragent wal-fetch``. b's coordinator (inside its daemon) takes the lease,
waits for replay to settle, promotes the standby and moves the DNS record.

Extra rows, labelled (``--no-native`` leaves them out): a **native streaming
replica** (``pg_basebackup -R``, streaming from a's PostgreSQL directly, not
through the vault) with both coordinators in this process
(``agent.lab.failover_drill.kill_trial``), at the drill's timing and at a
longer lease (``--baseline-ttl``; takeover_after scaled alike, fence_after as
far inside the lease as the drill's)
to show that detection — the lease — dominates the RTO.

Reported per trial and summarised (median, max): the phases of b's failover
record (detection = first failed probe → epoch acquired, i.e. lease expiry
and the probe window; fencing of the old region; catch-up; promotion; DNS;
serving), the RTO from the kill as the client saw it, the RPO from the WAL
heartbeats (the record) and from the client's log of acknowledged commits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.coordination.events import PHASES
from agent.failover_config import Rfc2136Switch
from agent.lab import Lab
from agent.lab.bind import lab_dns, resolve
from agent.lab.failover_drill import FAST, Drill, Writer, kill_trial, present_ids
from agent.lab.vault_standby import VaultStandbyRig
from agent.switch import build_switch
from agent.switch.rfc2136 import Rfc2136
from replicators import logs

COLUMNS = (*PHASES, "rto_record", "rto_client", "rpo_heartbeat", "rpo_client", "lost_rows")
WORK_ROOT = Path("/tmp/dragent-failover-bench")  # reachable by the postgres OS user
VAULT_FED = "vault-fed standby (real agents)"


def vault_fed_rig(lab: Lab, dns: Any, name: str) -> VaultStandbyRig:
    """One vault-fed trial's two agents (processes), their configurations and standby."""
    slot = "dragent_fb_" + name.replace("-", "_")[-40:]
    return VaultStandbyRig(lab, name, dns, WORK_ROOT / name, slot)


async def _until(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await check():
                return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{what} not within {within:g} s")


async def vault_fed_trial(lab: Lab, dns: Any, name: str) -> dict:
    """One kill trial with production's standby: fed from the vault by the real agents."""
    switch = Rfc2136(Rfc2136Switch(**dns.switch_config()))
    await switch.point_to("a")
    await switch.forget_epoch()  # this trial's etcd prefix starts its epochs over
    rig = vault_fed_rig(lab, dns, name)
    try:
        table = "fb_" + name.replace("-", "_")
        writer = Writer(rig.primary, table)
        await writer.setup()
        a, b = rig.agents["a"], rig.agents["b"]
        await rig.start()

        async def b_follows() -> bool:
            failover = ((await b.status()) or {}).get("failover") or {}
            a_status = (await a.status()) or {}
            return failover.get("lag_seconds") is not None and a_status.get("role") == "active"

        await _until(b_follows, 90, "b following a with a known lag")
        killed_at = await rig.kill_region_a(writer, acknowledged=49)

        async def b_serves() -> bool:
            status = await b.status()
            if not (status and status["role"] == "active" and status["epoch"] >= 2):
                return False
            if not status["failover"]["last_failover"]:
                return False
            answer = await resolve(dns.port, address=dns.address)
            return answer == [dns.addresses["b"]]

        await _until(b_serves, 90, "b serving under the new epoch, DNS on b")
        served_at = time.time()
        record = (await b.status())["failover"]["last_failover"]  # type: ignore[index]
        await lab.fault("a", "all", "start")
        present = await present_ids(rig.replica, table)
    finally:
        await rig.cleanup()
    kept = [t for i, t in writer.committed if i in present]
    lost = [t for i, t in writer.committed if i not in present]
    row = {p: record["phases"][p] for p in PHASES}
    row.update(
        rto_record=record["rto_seconds"],
        rto_client=round(served_at - killed_at, 3),
        rpo_heartbeat=record["rpo_seconds"],
        rpo_client=round(max(lost) - max(kept), 3) if lost and kept else 0.0,
        lost_rows=len(lost),
        errors=len(record.get("errors") or []),
    )
    return row


async def one_trial(lab: Lab, dns: Any, name: str, work: Path, timing: dict[str, float]) -> dict:
    await build_switch(Rfc2136Switch(**dns.switch_config())).point_to("a")
    async with Drill(lab, name, work / name, dns=dns, failover=timing) as drill:
        await drill.ready(60)
        trial = await kill_trial(drill)
    record = trial["record"]
    row = {p: record["phases"][p] for p in PHASES}
    row.update(
        rto_record=record["rto_seconds"],
        rto_client=trial["rto_client"],
        rpo_heartbeat=record["rpo_seconds"],
        rpo_client=trial["rpo_client"],
        lost_rows=trial["lost_rows"],
    )
    return row


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for col in COLUMNS:
        values = [float(r[col]) for r in rows if r.get(col) is not None]
        if values:
            out[col] = {"median": round(statistics.median(values), 3), "max": max(values)}
    return out


def table(results: dict[str, Any]) -> str:
    names = list(results["configs"])
    lines = [f"{'seconds (median / max)':<24}" + "".join(f"{n:>40}" for n in names)]
    for col in COLUMNS:
        cells = []
        for n in names:
            s = results["configs"][n]["summary"].get(col)
            cells.append(f"{s['median']:>26.3f} / {s['max']:<11.3f}" if s else f"{'-':>40}")
        lines.append(f"{col:<24}" + "".join(cells))
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    logs.configure("logfmt", "warning")
    root = Path(tempfile.mkdtemp(prefix="dragent-failover-bench-"))
    lab = Lab(root / "lab")
    configs: dict[str, dict[str, float]] = {VAULT_FED: {}}
    if not args.no_native:
        configs |= {
            f"native streaming replica, lease {FAST['lease_ttl']:g} s": {},
            f"native streaming replica, lease {args.baseline_ttl:g} s": {
                "lease_ttl": args.baseline_ttl,
                # the drill's fencing margin kept (it must fit inside the lease)
                "fence_after": args.baseline_ttl - (FAST["lease_ttl"] - FAST["fence_after"]),
                "takeover_after": args.baseline_ttl / 3,
            },
        }
    results: dict[str, Any] = {"trials": args.trials, "configs": {}}
    dns = None
    try:
        await lab.up()
        dns = lab_dns(lab)
        await dns.start()
        await dns.wait_ready()
        for cname, timing in configs.items():
            rows = []
            for i in range(args.trials):
                trial = f"bench-{len(results['configs'])}-{i}"
                if cname == VAULT_FED:
                    row = await vault_fed_trial(lab, dns, trial)
                else:
                    row = await one_trial(lab, dns, trial, root, timing)
                print(
                    f"{cname} trial {i + 1}: " + ", ".join(f"{k}={v}" for k, v in row.items()),
                    file=sys.stderr,
                )
                rows.append(row)
            results["configs"][cname] = {"timing": timing, "rows": rows, "summary": summarise(rows)}
    finally:
        if dns is not None:
            await dns.stop()
        await lab.down(purge=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--baseline-ttl", type=float, default=6.0)
    parser.add_argument(
        "--no-native", action="store_true", help="only the vault-fed standby, no extra rows"
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    arguments = parser.parse_args()
    outcome = asyncio.run(main(arguments))
    if arguments.json:
        print(table(outcome), file=sys.stderr)
        print(json.dumps(outcome, indent=2))
    else:
        print(table(outcome))
