"""DR commands: ``drill``, ``evidence``, ``compliance``, ``report``, ``runbook``.

- ``dragent drill restore --config F [--at TIME] [--stream S] [--format ...] [--out FILE]``:
  a restore drill from this region's vault into scratch copies, timed and
  Merkle-verified, recorded in the evidence log; exit 1 if it failed.
- ``dragent drill failover --config F [--i-understand]``: on a lab, kill region a,
  measure RTO/RPO by a writer's ground truth, fail back, record (refused unless
  ``[policy] drillable`` or ``--i-understand``).
- ``dragent evidence ls|verify --config F [--region R] [--public-key FILE]``.
- ``dragent evidence add-report FILE --config F``: record a signed
  verification report (``dragent verify ... --format json``) as evidence.
- ``dragent evidence rotate-signing-key --config F --new-key PATH [--reason TEXT]``:
  change the key that signs this region's evidence log (and its reports).
- ``dragent compliance status --config F [--json]``: evaluate the controls now.
- ``dragent report compliance --config F --from DATE --to DATE --format html|md|json``
  and ``dragent report check FILE --config F``.
- ``dragent report cost --config F --from T --to T [--prices FILE] [--json]``: what
  running costs, from the agent's cost log (agent/reports/cost.py, docs/cost.md).
- ``dragent runbook --config F [--format md|html] [--out FILE]``.

TIME/DATE: ``now``, an ISO date or time (UTC unless it has a zone), unix
seconds, or an age such as ``7d`` / ``12h`` (that long ago).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from agent.config import load_config

_AGO = re.compile(r"^-?(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_when(text: str, now: float | None = None) -> float:
    """Unix seconds for ``now``, an age (``7d``), unix seconds, or an ISO date/time (UTC)."""
    now = time.time() if now is None else now
    text = text.strip()
    if text == "now":
        return now
    match = _AGO.match(text)
    if match:
        return now - float(match.group(1)) * _UNIT[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected now, an age like 7d, unix seconds or an ISO date/time"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _write(text: str, out: str | None) -> None:
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"


# -- drill -----------------------------------------------------------------------------


def _cmd_drill_restore(args: argparse.Namespace) -> int:
    from agent.drills import run_restore_drill
    from agent.evidence import EvidenceLog
    from verifiers.report import to_html, to_markdown

    cfg = load_config(args.config)
    at = parse_when(args.at) if args.at else None

    async def run() -> dict[str, Any]:
        log = await EvidenceLog.open(cfg)
        try:
            report, entry = await run_restore_drill(cfg, log, at=at, streams=args.stream)
        finally:
            await log.aclose()
        print(f"evidence: {cfg.region}#{entry['seq']}", file=sys.stderr)
        return report

    report = asyncio.run(run())
    render = {"text": _drill_text, "json": _dump, "md": to_markdown, "html": to_html}
    _write(render[args.format](report), args.out)
    return 0 if report["ok"] else 1


def _drill_text(report: dict[str, Any]) -> str:
    lines = [("PASS: " if report["ok"] else "FAIL: ") + report["summary"]]
    for name, seconds in report["phases"].items():
        lines.append(f"  {name:<9} {seconds:8.3f}s")
    for s in report["streams"]:
        roots = ", ".join(f"{k} {v[:16]}" for k, v in s["roots"].items())
        lines.append(f"  {s['stream']}: {s['segments']} segments, {s['records']} records; {roots}")
        if s["problem"]:
            lines.append(f"    problem: {s['problem']}")
    return "\n".join(lines)


def _cmd_drill_failover(args: argparse.Namespace) -> int:
    from agent.drills.failover import check_allowed, failover_drill
    from agent.evidence import EvidenceLog

    cfg = load_config(args.config)
    root = check_allowed(cfg, Path(args.config), args.i_understand)

    async def run() -> dict[str, Any]:
        log = await EvidenceLog.open(cfg)
        try:
            data, entry = await failover_drill(cfg, root, log, within=args.within)
        finally:
            await log.aclose()
        print(f"evidence: {cfg.region}#{entry['seq']}", file=sys.stderr)
        return data

    data = asyncio.run(run())
    _write(_dump(data) if args.json else data["summary"], None)
    return 0 if data["ok"] else 1


# -- evidence --------------------------------------------------------------------------


async def _open_log(args: argparse.Namespace) -> Any:
    from agent.evidence import EvidenceLog

    cfg = load_config(args.config)
    region = args.region or cfg.region
    if region == cfg.region:
        return await EvidenceLog.open(cfg)
    peer = next((p for p in cfg.peers if p.name == region), None)
    if peer is None:
        raise SystemExit(f"dragent: {args.config}: no region {region!r} (this one or a peer)")
    return await EvidenceLog.reader(region, peer.vault)


def _cmd_evidence_ls(args: argparse.Namespace) -> int:
    async def run() -> list[dict[str, Any]]:
        log = await _open_log(args)
        try:
            return await log.entries()
        finally:
            await log.aclose()

    entries = [e for e in asyncio.run(run()) if not args.type or e["type"] == args.type]
    if args.json:
        _write(_dump(entries), None)
        return 0
    for e in entries:
        when = dt.datetime.fromtimestamp(e["time"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        data = e["data"]
        note = data.get("summary") or ("ok" if data.get("ok") else "") or ""
        print(f"{e['seq']:>6} {when} {e['type']:<18} {str(note)[:90]}")
    return 0


def _cmd_evidence_verify(args: argparse.Namespace) -> int:
    from verifiers.report import load_public_key

    public = load_public_key(Path(args.public_key)) if args.public_key else None

    async def run() -> Any:
        log = await _open_log(args)
        try:
            return await log.verify(public), await log.lock_enabled()
        finally:
            await log.aclose()

    report, locked = asyncio.run(run())
    head = {"seq": report.head[0], "hash": report.head[1]} if report.head else None
    if args.json:
        out = {"region": report.region, "ok": report.ok, "entries": len(report.entries)}
        out |= {"head": head, "object_lock": locked, "problems": report.problems}
        _write(_dump(out), None)
    else:
        verdict = "intact" if report.ok else f"DAMAGED ({len(report.problems)} problems)"
        print(
            f"evidence log of {report.region}: {len(report.entries)} entries, {verdict}; "
            f"head {head}; object lock {'on' if locked else 'off'}"
        )
        for p in report.problems:
            print(f"  {p['where']}: {p['what']}")
    return 0 if report.ok else 1


def _cmd_evidence_add_report(args: argparse.Namespace) -> int:
    from agent.compliance.controls import VERIFICATION
    from agent.evidence import EvidenceLog
    from verifiers.report import check, load_or_create_signing_key

    cfg = load_config(args.config)
    report = json.loads(Path(args.file).read_text())
    check(report, load_or_create_signing_key(cfg.signing_key_path).public_key())
    fields = ("kind", "stream", "ok", "summary", "at", "roots", "counts", "started_at")
    data = {k: report.get(k) for k in fields} | {"report_signature": report["signature"]["value"]}

    async def run() -> dict[str, Any]:
        log = await EvidenceLog.open(cfg)
        try:
            return await log.append(VERIFICATION, data)
        finally:
            await log.aclose()

    entry = asyncio.run(run())
    print(f"recorded {args.file} as {cfg.region}#{entry['seq']}")
    return 0


_ROTATE_HELP = """\
Change the key that signs this region's evidence log (and its reports).

The chain's current key (the one at the configured report-signing key path)
signs a signing-key.change entry naming the new public key; once that entry
is stored, the new key (PEM Ed25519 private key, e.g. from `openssl genpkey
-algorithm ed25519 -out new.key`) replaces the old one at that path (mode
0600, atomically, with its .pub). Run it again if it was interrupted: it
sees the entry already naming the new key and only installs it. Then copy
the new key to the region's other agents (they refuse to write evidence
with the old one) and remove PATH.

If the current key is lost, this is refused: no other key can continue the
chain. Restore the key from its backup; see docs/operations.md,
"Changing the signing key".
"""


def _cmd_evidence_rotate_key(args: argparse.Namespace) -> int:
    from agent.evidence.keys import read_private_key
    from agent.evidence.rotate import rotate_signing_key

    cfg = load_config(args.config)
    new = read_private_key(Path(args.new_key))
    if new is None:
        print(f"dragent: {args.new_key}: no such file", file=sys.stderr)
        return 2
    rotation = asyncio.run(rotate_signing_key(cfg, new, reason=args.reason))
    print(rotation.summary(cfg.signing_key_path))
    print(
        f"copy {cfg.signing_key_path} to every other agent of region {cfg.region}, "
        f"then remove {args.new_key}",
        file=sys.stderr,
    )
    return 0


# -- compliance and reports -----------------------------------------------------------


def _cmd_compliance_status(args: argparse.Namespace) -> int:
    from agent.reports.compliance import compliance_report

    cfg = load_config(args.config)
    now = time.time()
    report = asyncio.run(compliance_report(cfg, now - cfg.policy.rpo_window, now, now=now))
    if args.json:
        _write(_dump(report["controls"]), None)
    else:
        for r in report["controls"]:
            print(f"{r['status'].upper():<8} {r['control']:<22} {r['reason']}")
    return 0 if report["ok"] else 1


def _cmd_report_compliance(args: argparse.Namespace) -> int:
    from agent.reports.compliance import compliance_report
    from agent.reports.render import to_html, to_markdown

    cfg = load_config(args.config)
    start, end = parse_when(args.start), parse_when(args.end)
    if end <= start:
        print("dragent: --to must be after --from", file=sys.stderr)
        return 2
    report = asyncio.run(compliance_report(cfg, start, end))
    render = {"json": _dump, "md": to_markdown, "html": to_html}[args.format]
    _write(render(report), args.out)
    return 0


def _cmd_report_check(args: argparse.Namespace) -> int:
    from agent.reports.compliance import check_report
    from verifiers.report import load_or_create_signing_key, load_public_key

    cfg = load_config(args.config)
    text = Path(args.file).read_text()
    if args.file.endswith((".html", ".htm")):
        match = re.search(r'id="dragent-report">(.*?)</script>', text, re.S)
        text = match.group(1).replace("<\\/", "</") if match else "{}"
    report = json.loads(text)
    if args.public_key:
        public = load_public_key(Path(args.public_key))
    else:
        public = load_or_create_signing_key(cfg.signing_key_path).public_key()
    asyncio.run(check_report(cfg, report, public))
    print(f"{args.file}: signature valid; every evidence head it cites is in its log")
    return 0


def _cmd_report_cost(args: argparse.Namespace) -> int:
    from agent.costlog import FILE, load_prices, read_samples
    from agent.reports.cost import PriceError, cost_report, to_text

    try:
        prices = load_prices(Path(args.prices) if args.prices else None)
    except PriceError as exc:
        print(f"dragent: {exc}", file=sys.stderr)
        return 2
    path = Path(args.log) if args.log else load_config(args.config).data_dir / FILE
    start, end = parse_when(args.start), parse_when(args.end)
    if end <= start:
        print("dragent: --to must be after --from", file=sys.stderr)
        return 2
    samples = read_samples(path)
    if not samples:
        print(f"dragent: {path}: no cost samples (the agent writes them)", file=sys.stderr)
        return 1
    report = cost_report(samples, prices, start, end, archive_timeout=args.archive_timeout)
    report["log"] = str(path)
    _write(_dump(report) if args.json else to_text(report), args.out)
    return 0


def _cmd_runbook(args: argparse.Namespace) -> int:
    from agent.runbook import render_runbook

    cfg = load_config(args.config)
    _write(render_runbook(cfg, Path(args.config), fmt=args.format), args.out)
    return 0


# -- registration ----------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    """Add the DR commands to a ``dragent`` subparsers object."""
    drill = sub.add_parser("drill", help="DR drills")
    dsub = drill.add_subparsers(dest="drill", required=True)
    rest = dsub.add_parser("restore", help="restore drill into scratch copies, timed, verified")
    rest.add_argument("--config", required=True)
    rest.add_argument("--at", help="restore the state at TIME (default: the newest)")
    rest.add_argument("--stream", action="append", help="only this stream (repeatable)")
    rest.add_argument("--format", choices=["text", "json", "md", "html"], default="text")
    rest.add_argument("--out")
    rest.set_defaults(func=_cmd_drill_restore)

    fo = dsub.add_parser("failover", help="game day on a lab: kill region a, measure, fail back")
    fo.add_argument("--config", required=True, help="a lab region's agent.toml")
    fo.add_argument("--i-understand", action="store_true", help="run on a non-drillable config")
    fo.add_argument("--within", type=float, default=60.0, help="give up after this many seconds")
    fo.add_argument("--json", action="store_true")
    fo.set_defaults(func=_cmd_drill_failover)

    ev = sub.add_parser("evidence", help="the hash-chained evidence log")
    esub = ev.add_subparsers(dest="action", required=True)
    ls = esub.add_parser("ls", help="list entries")
    ls.add_argument("--config", required=True)
    ls.add_argument("--region", help="a peer's log (default: this region's)")
    ls.add_argument("--type", help="only entries of this type")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_evidence_ls)
    ver = esub.add_parser("verify", help="find changed, removed or reordered entries")
    ver.add_argument("--config", required=True)
    ver.add_argument("--region")
    ver.add_argument("--public-key", help="pin the signing key (default: the genesis entry's)")
    ver.add_argument("--json", action="store_true")
    ver.set_defaults(func=_cmd_evidence_verify)
    add = esub.add_parser("add-report", help="record a signed verification report")
    add.add_argument("file")
    add.add_argument("--config", required=True)
    add.set_defaults(func=_cmd_evidence_add_report)
    rot = esub.add_parser(
        "rotate-signing-key",
        help="change the evidence log's signing key, recorded in the log",
        description=_ROTATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rot.add_argument("--config", required=True)
    rot.add_argument(
        "--new-key", required=True, metavar="PATH", help="the new Ed25519 private key (PEM)"
    )
    rot.add_argument("--reason", default="", help="why, recorded in the entry")
    rot.set_defaults(func=_cmd_evidence_rotate_key)

    comp = sub.add_parser("compliance", help="compliance controls")
    csub = comp.add_subparsers(dest="action", required=True)
    st = csub.add_parser("status", help="evaluate every control now")
    st.add_argument("--config", required=True)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_compliance_status)

    rep = sub.add_parser("report", help="signed compliance reports")
    rsub = rep.add_subparsers(dest="report", required=True)
    rc = rsub.add_parser("compliance", help="report over a period")
    rc.add_argument("--config", required=True)
    rc.add_argument("--from", dest="start", required=True)
    rc.add_argument("--to", dest="end", default="now")
    rc.add_argument("--format", choices=["html", "md", "json"], default="html")
    rc.add_argument("--out")
    rc.set_defaults(func=_cmd_report_compliance)
    chk = rsub.add_parser("check", help="check a report's signature against the evidence logs")
    chk.add_argument("file")
    chk.add_argument("--config", required=True)
    chk.add_argument("--public-key")
    chk.set_defaults(func=_cmd_report_check)
    cost = rsub.add_parser("cost", help="what running costs: requests, transfer, storage")
    where = cost.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="read <data_dir>/cost.jsonl of this agent")
    where.add_argument("--log", help="read this cost log (a cost.jsonl)")
    cost.add_argument("--from", dest="start", required=True)
    cost.add_argument("--to", dest="end", default="now")
    cost.add_argument("--prices", help="price table (TOML; default: AWS S3 us-east-1)")
    cost.add_argument(
        "--archive-timeout", type=float, default=60.0, help="pgBackRest comparison (seconds)"
    )
    cost.add_argument("--json", action="store_true")
    cost.add_argument("--out")
    cost.set_defaults(func=_cmd_report_cost)

    rb = sub.add_parser("runbook", help="runbooks and communication plan from the configuration")
    rb.add_argument("--config", required=True)
    rb.add_argument("--format", choices=["md", "html"], default="md")
    rb.add_argument("--out")
    rb.set_defaults(func=_cmd_runbook)
