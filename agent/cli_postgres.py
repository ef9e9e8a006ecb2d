"""PostgreSQL commands: ``wal-fetch``, ``backup postgres``, ``standby init``, ``restore postgres``.

- ``dragent wal-fetch %f %p --spool DIR``: a standby's restore_command (see
  ``replicators.postgres.walfetch``; ``standby init`` writes the faster
  system-Python form of the same command).
- ``dragent backup postgres --config F``: a base backup of the active
  region's primary into every peer's vault.
- ``dragent standby init --config F``: the passive region's warm standby,
  from the newest base backup in this region's vault, started.
- ``dragent restore postgres --config F --to latest|TIME|LSN --target-dir DIR``:
  a new cluster at that point, started and promoted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from agent.cli_restore import kind_parser
from agent.config import AgentConfig, ConfigError, StreamConfig, load_config
from replicators.paths import StreamPaths
from replicators.postgres import walfetch
from replicators.vault import open_vault


def _stream(cfg: AgentConfig, name: str | None, path: str) -> StreamConfig:
    streams = [s for s in cfg.streams if s.kind == "postgres" and (name is None or s.name == name)]
    if len(streams) != 1:
        what = f"no postgres stream named {name!r}" if name else "not exactly one postgres stream"
        raise ConfigError(path, [f"streams: {what} (use --stream)"])
    return streams[0]


def _bar(desc: str) -> tuple[tqdm, Callable[[int], None]]:
    bar = tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
    return bar, bar.update


def _cmd_wal_fetch(args: argparse.Namespace) -> int:
    return walfetch.main([args.name, args.dest, "--spool", args.spool])


def _cmd_backup(args: argparse.Namespace) -> int:
    from replicators.postgres.basebackup import take_backup

    cfg = load_config(args.config)
    stream = _stream(cfg, args.stream, args.config)
    assert stream.postgres is not None

    async def run() -> int:
        for peer in cfg.peers:
            async with open_vault(peer.vault, peer.keys) as (vault, keys):
                store = vault.store
                bar, update = _bar(f"backup to {peer.name}")
                with bar:
                    m = await take_backup(
                        stream.postgres, stream.name, store, keys, on_bytes=update
                    )
            print(f"{peer.name}: backup {m.id}: {m.bytes} bytes in {len(m.parts)} parts")
        return 0

    return asyncio.run(run())


def _cmd_standby_init(args: argparse.Namespace) -> int:
    from replicators.postgres.kind import spool_dir
    from replicators.postgres.standby import init_standby

    cfg = load_config(args.config)
    stream = _stream(cfg, args.stream, args.config)
    options = stream.postgres
    assert options is not None
    data_dir = Path(args.data_dir) if args.data_dir else options.standby_data_dir
    if data_dir is None:
        raise ConfigError(
            args.config, ["streams.postgres.standby_data_dir: not set (or --data-dir)"]
        )
    port = args.port or options.standby_port
    spool = spool_dir(stream, StreamPaths(cfg.data_dir, stream.name).target)

    async def run() -> int:
        async with open_vault(cfg.vault, cfg.keys) as (vault, keys):
            store = vault.store
            m = await init_standby(
                options,
                stream.name,
                store,
                keys,
                data_dir=data_dir,
                port=port,
                spool=spool,
                run=not args.no_start,
            )
        state = "started" if not args.no_start else "built (start it with pg_ctl -D ... start)"
        print(f"standby {state} in {data_dir} on port {port}, from backup {m.id}")
        return 0

    return asyncio.run(run())


def _cmd_restore(args: argparse.Namespace) -> int:
    from replicators.postgres.restore import RestoreTarget, restore

    cfg = load_config(args.config)
    stream = _stream(cfg, args.stream, args.config)
    assert stream.postgres is not None
    try:
        target = RestoreTarget.parse(args.to)
    except ValueError as exc:
        print(f"dragent: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        async with open_vault(cfg.vault, cfg.keys) as (vault, keys):
            store = vault.store
            bar, update = _bar("restore")
            with bar:
                result = await restore(
                    stream.postgres,
                    stream.name,
                    store,
                    keys,
                    target=target,
                    data_dir=Path(args.target_dir),
                    port=args.port,
                    on_bytes=update,
                )
        print(
            f"restored {args.target_dir} from backup {result.backup_id} and "
            f"{result.segments} WAL segments: at LSN {result.lsn}, last commit "
            f"{_iso(result.replay_time)}; running on port {args.port}"
        )
        return 0

    return asyncio.run(run())


def _iso(t: float | None) -> str:
    import datetime as dt

    return "unknown" if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat()


def register(sub: argparse._SubParsersAction) -> None:
    """Add the PostgreSQL commands to a ``dragent`` subparsers object."""
    fetch = sub.add_parser("wal-fetch", help="restore_command: serve a WAL file from a spool")
    walfetch.add_arguments(fetch)
    fetch.set_defaults(func=_cmd_wal_fetch)

    backup = sub.add_parser("backup", help="take a base backup into every peer's vault")
    backup.add_argument("kind", choices=["postgres"])
    backup.add_argument("--config", required=True)
    backup.add_argument("--stream", help="the postgres stream (when there are several)")
    backup.set_defaults(func=_cmd_backup)

    standby = sub.add_parser("standby", help="the passive region's warm standby")
    ssub = standby.add_subparsers(dest="action", required=True)
    init = ssub.add_parser("init", help="build and start the standby from the vault")
    init.add_argument("--config", required=True)
    init.add_argument("--stream")
    init.add_argument("--data-dir", help="default: streams.postgres.standby_data_dir")
    init.add_argument("--port", type=int, help="default: streams.postgres.standby_port")
    init.add_argument("--no-start", action="store_true", help="build it but do not start it")
    init.set_defaults(func=_cmd_standby_init)

    rest = kind_parser(sub, "postgres", "a new PostgreSQL at a time, an LSN or the latest")
    rest.add_argument("--config", required=True)
    rest.add_argument("--stream")
    rest.add_argument("--to", required=True, help="latest, an ISO time (UTC default) or an LSN X/Y")
    rest.add_argument("--target-dir", required=True, help="new data directory (absent or empty)")
    rest.add_argument("--port", type=int, default=5434)
    rest.set_defaults(func=_cmd_restore)
