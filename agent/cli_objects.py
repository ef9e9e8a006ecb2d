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
"""

from __future__ import annotations

import argparse
import asyncio
import sys
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
