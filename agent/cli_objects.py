"""Object commands: ``restore objects`` and ``objects verify``.

- ``dragent restore objects --config F --bucket B [--prefix P] --to TIME --into BUCKET``:
  rebuild the objects of the stream replicating bucket ``B`` (keys under
  ``P``, relative to the stream's source prefix) as they were at ``TIME``,
  from this region's vault, into ``BUCKET`` on the mirror's endpoint
  (keys keep the source prefix).
- ``dragent objects verify --config F [--stream S] [--deep] [--dry-run]
  [--format json|md|html] [--out FILE]``: Merkle comparison of source and
  mirror, repairs unless ``--dry-run``, writes a report signed with the
  region's key.
- ``dragent objects deletes status|approve|reject --config F [--stream S]``: the
  deletes the mirror's mass-delete guard holds (docs/objects-guard.md), and the
  operator's decision on them, written for the agent of this region (the passive
  one) to carry out; ``--wait`` seconds for it to be done (default 30; 0: return
  at once).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from agent.cli_restore import kind_parser
from agent.config import AgentConfig, ConfigError, StreamConfig, load_config


def parse_time(text: str) -> int:
    """Unix nanoseconds from unix seconds or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        return int(float(text) * 1e9)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--to {text!r}: expected an ISO 8601 time or unix seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1e9)


def _stream(cfg: AgentConfig, path: str, name: str | None, bucket: str | None) -> StreamConfig:
    found = [
        s
        for s in cfg.streams
        if s.kind == "objects"
        and s.objects is not None
        and (name is None or s.name == name)
        and (bucket is None or s.objects.source.bucket == bucket)
    ]
    if len(found) != 1:
        what = f"bucket {bucket!r}" if bucket else f"name {name!r}" if name else "any name"
        raise ConfigError(path, [f"streams: not exactly one objects stream for {what}"])
    return found[0]


async def _restore(
    cfg: AgentConfig, stream: StreamConfig, prefix: str, to_ns: int, into: str
) -> int:
    from replicators.bucket import Bucket
    from replicators.objects.restore import restore
    from replicators.vault import open_vault

    assert stream.objects is not None
    target = stream.objects.mirror.model_copy(
        update={"bucket": into, "prefix": stream.objects.source.prefix}
    )
    async with open_vault(cfg.vault, cfg.keys) as (vault, keys):
        bucket = await Bucket.open(target)
        try:
            result = await restore(vault, keys, stream.name, prefix, to_ns, bucket)
        finally:
            await bucket.aclose()
    at = datetime.fromtimestamp(to_ns / 1e9, UTC).isoformat()
    print(
        f"restored {result.objects} objects ({result.bytes} bytes) of {stream.name}:{prefix!r} "
        f"as of {at} into {into}; {result.deleted_at_time} were deleted by then; "
        f"{result.segments_read} segments read"
    )
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    missing = [f"--{n}" for n in ("bucket", "to", "into") if not getattr(args, n, None)]
    if missing:
        print(f"dragent: restore objects needs {', '.join(missing)}", file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    stream = _stream(cfg, args.config, getattr(args, "stream", None), args.bucket)
    try:
        to_ns = parse_time(args.to)
    except ValueError as exc:
        print(f"dragent: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_restore(cfg, stream, args.prefix or "", to_ns, args.into))


async def _verify(cfg: AgentConfig, stream: StreamConfig, deep: bool, repair: bool) -> dict:
    from replicators.objects.kind import verify

    return await verify(stream, cfg, deep=deep, repair=repair)


def _cmd_verify(args: argparse.Namespace) -> int:
    from verifiers.report import load_or_create_signing_key, sign, to_html, to_markdown

    cfg = load_config(args.config)
    stream = _stream(cfg, args.config, args.stream, None)
    report = asyncio.run(_verify(cfg, stream, args.deep, not args.dry_run))
    signed = sign(report, load_or_create_signing_key(cfg.signing_key_path))
    if args.format == "md":
        text = to_markdown(signed)
    elif args.format == "html":
        text = to_html(signed)
    else:
        import json

        text = json.dumps(signed, indent=2, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    print(signed["summary"], file=sys.stderr)
    return 0 if signed["ok"] else 1


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds") if t else "-"


def _print_status(name: str, state_dir: Path, show: int) -> None:
    from replicators.objects import held

    guard = held.read_guard(state_dir)
    hold, deletes = guard["hold"], guard["held"]
    decision = held.read_decision(state_dir)
    if hold is None:
        print(f"{name}: no deletes held ({len(guard['window'])} deletes in the recent window)")
    else:
        print(
            f"{name}: {len(deletes)} deletes held since {_when(hold['since'])} (hold {hold['id']})"
        )
        print(f"  reason: {hold['reason']}")
        before = hold.get("applied_before") or []
        print(f"  applied before the guard tripped: {len(before)}")
        for d in deletes[:show]:
            print(f"  {d['key']}  (segment {d['segment']}, position {d['position']})")
        if len(deletes) > show:
            print(f"  ... and {len(deletes) - show} more (--format json lists them all)")
    if decision is not None:
        print(f"  decision pending: {decision['decision']} (at {_when(decision['at'])})")
    rejected = held.rejected(state_dir)
    if rejected:
        print(f"  {len(rejected)} rejected deletes on record (verify accepts those keys)")


def _cmd_deletes(args: argparse.Namespace) -> int:
    from replicators.objects import held
    from replicators.paths import StreamPaths

    cfg = load_config(args.config)
    stream = _stream(cfg, args.config, args.stream, None)
    state_dir = StreamPaths(cfg.data_dir, stream.name).target
    guard = held.read_guard(state_dir)
    if args.deletes_action == "status":
        if args.format == "json":
            body = {
                "stream": stream.name,
                **guard,
                "decision": held.read_decision(state_dir),
                "rejected": held.rejected(state_dir),
            }
            print(json.dumps(body, indent=2, sort_keys=True))
        else:
            _print_status(stream.name, state_dir, args.show)
        return 0
    hold = guard["hold"]
    if hold is None:
        print(f"dragent: {stream.name}: no deletes are held", file=sys.stderr)
        return 1
    if args.hold and args.hold != hold["id"]:
        print(f"dragent: the hold now is {hold['id']}, not {args.hold}", file=sys.stderr)
        return 1
    held.request(state_dir, args.deletes_action, hold["id"], by=getpass.getuser())
    what = f"{args.deletes_action} of {len(guard['held'])} held deletes of {stream.name}"
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        if held.read_decision(state_dir) is None:
            print(f"{what}: done")
            return 0
        time.sleep(0.5)
    if args.wait > 0:
        print(f"{what}: recorded, not yet carried out (is the agent running?)", file=sys.stderr)
        return 3
    print(f"{what}: recorded; the agent carries it out within seconds")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the object commands to a ``dragent`` subparsers object."""
    rest = kind_parser(sub, "objects", "a bucket or prefix as it was at a time")
    rest.add_argument("--config", required=True)
    rest.add_argument("--stream")
    rest.add_argument("--bucket", help="the source bucket the stream replicates")
    rest.add_argument("--prefix", help="only keys under this prefix")
    rest.add_argument("--to", required=True, help="an ISO time (UTC default) or unix seconds")
    rest.add_argument("--into", help="the bucket to restore into")
    rest.set_defaults(func=_cmd_restore)

    objects = sub.add_parser("objects", help="object-store replication")
    osub = objects.add_subparsers(dest="action", required=True)
    verify = osub.add_parser("verify", help="compare source and mirror (Merkle), repair, sign")
    verify.add_argument("--config", required=True)
    verify.add_argument("--stream", help="the objects stream (when there are several)")
    verify.add_argument("--deep", action="store_true", help="re-read and re-hash the mirror")
    verify.add_argument("--dry-run", action="store_true", help="report differences, repair none")
    verify.add_argument("--format", choices=["json", "md", "html"], default="json")
    verify.add_argument("--out", help="write the report here (default: stdout)")
    verify.set_defaults(func=_cmd_verify)

    deletes = osub.add_parser("deletes", help="deletes held by the mirror's mass-delete guard")
    dsub = deletes.add_subparsers(dest="deletes_action", required=True)
    helps = {
        "status": "what is held, why, since when",
        "approve": "apply the held deletes to the mirror (in order; keys put again are kept)",
        "reject": "discard them: the mirror keeps the keys, verify accepts the difference",
    }
    for action, text in helps.items():
        p = dsub.add_parser(action, help=text)
        p.add_argument("--config", required=True)
        p.add_argument("--stream", help="the objects stream (when there are several)")
        if action == "status":
            p.add_argument("--format", choices=["text", "json"], default="text")
            p.add_argument("--show", type=int, default=20, help="held keys listed (text)")
        else:
            p.add_argument("--hold", help="decide only if this is the current hold's id")
            p.add_argument("--wait", type=float, default=30.0, help="seconds (0: do not wait)")
        p.set_defaults(func=_cmd_deletes)
