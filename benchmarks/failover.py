"""Failover benchmark: RTO and RPO over kill trials, each phase timed.

Usage: ``python benchmarks/failover.py [--trials 5] [--baseline-ttl 6] [--json]``

Brings up a lab (real etcd with three members, PostgreSQL, SeaweedFS, BIND).
Each trial (``agent.coordination.drill.kill_trial``): a fresh streaming
standby of region a in region b, both coordinators running, a client writing
a row every 20 ms to region a; then region a is killed whole (coordinator,
PostgreSQL, S3, etcd member) and the clock runs until region b took a write
under the new epoch and the DNS name resolves to b. Region a is restarted
between trials.

Reported per trial and summarised (median, max): the phases of b's failover
record (detection = first failed probe → epoch acquired, i.e. lease expiry
and the probe window; fencing of the old region; catch-up; promotion; DNS;
serving), the RTO from the kill as the client saw it, the RPO from the WAL
heartbeats (the record) and from the client's log of acknowledged commits.

Side by side in one run: the drill's timing (lease 3 s, fence after 2 s,
takeover after 1 s of failed probes) and a baseline with a longer lease
(``--baseline-ttl``, fence_after and takeover_after scaled alike), to show
that detection — the lease — dominates the RTO.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import logs
from agent.coordination.drill import Drill, kill_trial
from agent.coordination.events import PHASES
from agent.failover_config import Rfc2136Switch
from agent.lab import Lab
from agent.lab.bind import lab_dns
from agent.switch.base import build_switch

COLUMNS = (*PHASES, "rto_record", "rto_client", "rpo_heartbeat", "rpo_client", "lost_rows")


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
    lines = [f"{'seconds (median / max)':<24}" + "".join(f"{n:>26}" for n in names)]
    for col in COLUMNS:
        cells = []
        for n in names:
            s = results["configs"][n]["summary"].get(col)
            cells.append(f"{s['median']:>12.3f} / {s['max']:<11.3f}" if s else f"{'-':>26}")
        lines.append(f"{col:<24}" + "".join(cells))
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    logs.configure("logfmt", "warning")
    root = Path(tempfile.mkdtemp(prefix="dragent-failover-bench-"))
    lab = Lab(root / "lab")
    configs = {
        "drill (ttl 3s)": {},
        f"baseline (ttl {args.baseline_ttl:g}s)": {
            "lease_ttl": args.baseline_ttl,
            "fence_after": args.baseline_ttl * 2 / 3,
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
                row = await one_trial(
                    lab, dns, f"bench-{len(results['configs'])}-{i}", root, timing
                )
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
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    arguments = parser.parse_args()
    outcome = asyncio.run(main(arguments))
    if arguments.json:
        print(table(outcome), file=sys.stderr)
        print(json.dumps(outcome, indent=2))
    else:
        print(table(outcome))
