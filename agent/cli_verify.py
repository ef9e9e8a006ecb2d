"""``dragent verify STREAM --config F``: verify one stream now, with any kind's ``verify()``.

Calls the optional ``verify(stream, agent, deep=, repair=)`` of the stream's
kind (``replicators.registry.module(kind)``), signs the report with the region's
key (``report_signing_key``, by default ``<data_dir>/report-signing.key``) and writes it as
JSON, Markdown or HTML to ``--out`` or stdout. Exit 0 when the copies match,
1 when the report found differences or the kind cannot verify, 2 for a bad
configuration or an unknown stream.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.verifyjobs import verify_function
from verifiers.report import load_or_create_signing_key, sign, to_html, to_markdown


def render(report: dict[str, Any], fmt: str) -> str:
    if fmt == "md":
        return to_markdown(report)
    if fmt == "html":
        return to_html(report)
    import json

    return json.dumps(report, indent=2, sort_keys=True, default=str) + "\n"


def _cmd_verify(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    try:
        stream = cfg.stream(args.stream)
    except KeyError:
        names = ", ".join(s.name for s in cfg.streams) or "none"
        print(f"{args.config}: no stream named {args.stream!r} (streams: {names})", file=sys.stderr)
        return 2
    fn = verify_function(stream)
    if fn is None:
        print(f"dragent: kind {stream.kind!r} has no on-demand verification", file=sys.stderr)
        return 1
    if sys.stderr.isatty():
        print(f"verifying {stream.name} ({stream.kind})…", file=sys.stderr)
    report = asyncio.run(fn(stream, cfg, deep=args.deep, repair=args.repair))
    signed = sign(report, load_or_create_signing_key(cfg.signing_key_path))
    text = render(signed, args.format)
    if args.out:
        Path(args.out).write_text(text)
        print(f"{args.out}: {signed.get('summary', '')}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0 if signed.get("ok") else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``verify`` to a ``dragent`` subparsers object."""
    verify = sub.add_parser("verify", help="verify one stream's copy now and write a signed report")
    verify.add_argument("stream", help="the stream's name in the configuration")
    verify.add_argument("--config", required=True, help="the region's TOML file")
    verify.add_argument("--deep", action="store_true", help="also compare the target copy")
    verify.add_argument(
        "--repair", action="store_true", help="repair what differs (if the kind can)"
    )
    verify.add_argument("--format", choices=["json", "md", "html"], default="json")
    verify.add_argument("--out", help="write the report here (default: stdout)")
    verify.set_defaults(func=_cmd_verify)
