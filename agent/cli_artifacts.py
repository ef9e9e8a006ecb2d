"""Artifact commands: ``restore artifacts`` and ``artifacts ls``.

- ``dragent restore artifacts --config F --model M --version V --to DIR``:
  one version from this region's vault into ``DIR`` (absent or empty), every
  chunk verified, with a progress bar; ``DIR`` holds the whole version or
  nothing.
- ``dragent artifacts ls --config F``: the versions this region's vault holds
  (model, version, size, files, root).

On-demand verification (roots, and the scrub with ``--deep``) is the generic
``dragent verify <stream>``, which calls ``replicators.artifacts.kind.verify``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from tqdm import tqdm

from agent.cli_restore import kind_parser
from agent.config import AgentConfig, ConfigError, StreamConfig, load_config
from replicators.vault import open_vault


def _stream(cfg: AgentConfig, name: str | None, path: str) -> StreamConfig:
    streams = [s for s in cfg.streams if s.kind == "artifacts" and (name is None or s.name == name)]
    if len(streams) != 1:
        what = f"no artifacts stream named {name!r}" if name else "not exactly one artifacts stream"
        raise ConfigError(path, [f"streams: {what} (use --stream)"])
    return streams[0]


async def _restore(cfg: AgentConfig, stream: str, model: str, version: str, to: Path) -> int:
    from replicators.artifacts.restore import find, restore

    async with open_vault(cfg.vault, cfg.keys) as (vault, keys):
        try:
            m = await find(vault, keys, stream, model, version)
        except LookupError as exc:
            print(f"dragent: {exc}", file=sys.stderr)
            return 1
        with tqdm(
            total=m.size,
            desc=f"restore {m.name}",
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
        ) as bar:
            await restore(m, vault, keys, to, bar.update)
    print(
        f"restored {m.name} into {to}: {len(m.files)} files, {m.size} bytes, root {m.root().hex()}"
    )
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    if not (args.model and args.version and args.to):
        print("dragent: restore artifacts needs --model, --version and --to DIR", file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    stream = _stream(cfg, args.stream, args.config)
    return asyncio.run(_restore(cfg, stream.name, args.model, args.version, Path(args.to)))


async def _ls(cfg: AgentConfig, stream: str, as_json: bool) -> int:
    from replicators.artifacts.restore import catalogue

    async with open_vault(cfg.vault, cfg.keys) as (vault, keys):
        known = await catalogue(vault, keys, stream)
    rows = [
        {
            "model": m.model,
            "version": m.version,
            "files": len(m.files),
            "bytes": m.size,
            "root": m.root().hex(),
            "source_time": m.source_time,
        }
        for m in sorted(known.values(), key=lambda m: (m.model, m.version))
    ]
    if as_json:
        from agent.jsonout import print_json

        print_json(rows)
    else:
        for r in rows:
            print(
                f"{r['model']}/{r['version']}\t{r['files']} files\t{r['bytes']} bytes\t{r['root']}"
            )
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    stream = _stream(cfg, args.stream, args.config)
    return asyncio.run(_ls(cfg, stream.name, args.json))


def register(sub: argparse._SubParsersAction) -> None:
    """Add the artifact commands to a ``dragent`` subparsers object."""
    rest = kind_parser(sub, "artifacts", "one model version into a directory")
    rest.add_argument("--config", required=True)
    rest.add_argument("--stream", help="the artifacts stream (when there are several)")
    rest.add_argument("--model", required=True)
    rest.add_argument("--version", required=True)
    rest.add_argument("--to", required=True, help="directory to restore into (absent or empty)")
    rest.set_defaults(func=_cmd_restore)

    art = sub.add_parser("artifacts", help="model artifacts in this region's vault")
    asub = art.add_subparsers(dest="action", required=True)
    ls = asub.add_parser("ls", help="list the versions this region's vault holds")
    ls.add_argument("--config", required=True)
    ls.add_argument("--stream", help="the artifacts stream (when there are several)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_ls)
