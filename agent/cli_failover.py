"""Failover commands.

- ``dragent failover --to REGION --config FILE [--force]``: promote REGION now
  (run with REGION's config). Refused while the old leader's lease is alive
  unless ``--force``.
- ``dragent switchover --to REGION --config FILE``: planned, loses nothing.
- ``dragent failback --config FILE``: re-seed this (old) region's PostgreSQL
  as a standby of the current leader (pg_rewind, else a base backup); then
  ``dragent switchover --to`` this region moves traffic back.
- ``dragent ha status|pause|resume --config FILE``: the lease, epoch, last
  failover and every region's published health; pause/resume automation for
  every region at once.
- ``dragent keeper --config FILE``: the keeper (``agent.coordination.keeper``),
  a process of its own that fences this region's PostgreSQL when the agent
  stops petting it (a paused or hung agent).

Exit status: 0 done, 1 refused or failed (the reason on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, load_config
from replicators.errors import DragentError


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``failover``, ``switchover``, ``failback`` and ``ha``."""
    for name, planned, text in (
        ("failover", False, "promote a region now (unplanned)"),
        ("switchover", True, "move the primary to a region without losing anything"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--to", required=True, help="the region to promote (its config)")
        p.add_argument("--config", required=True, type=Path, help="the target region's TOML")
        p.add_argument("--old-dsn", help="the old primary's DSN (default: from peer_probes)")
        if not planned:
            p.add_argument("--force", action="store_true", help="even if the lease is held")
        p.set_defaults(func=_cmd_move, planned=planned)
    back = sub.add_parser("failback", help="re-seed this region as a standby of the leader")
    back.add_argument("--config", required=True, type=Path, help="this (old) region's TOML")
    back.add_argument("--source-dsn", help="the current primary (default: from peer_probes)")
    back.set_defaults(func=_cmd_failback)
    ha = sub.add_parser("ha", help="failover automation: status, pause, resume")
    ha.add_argument("action", choices=["status", "pause", "resume"])
    ha.add_argument("--config", required=True, type=Path)
    ha.add_argument("--why", default="", help="recorded with a pause")
    ha.set_defaults(func=_cmd_ha)
    keeper = sub.add_parser(
        "keeper", help="fence this region's PostgreSQL when the agent stops petting"
    )
    keeper.add_argument("--config", required=True, type=Path, help="this region's TOML")
    keeper.set_defaults(func=_cmd_keeper)


def _cmd_keeper(args: argparse.Namespace) -> int:
    import signal

    from agent.coordination.keeper import Keeper

    cfg = load_config(args.config)
    path = cfg.failover.keeper_socket
    if path is None:
        print(f"dragent: {args.config}: [failover] keeper_socket is not set", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Keeper(cfg.failover, path, cfg.region).run(stop)

    asyncio.run(main())
    return 0


async def _last_change(lease: Any, epoch: int) -> dict[str, Any] | None:
    """The newest failover or switchover record in etcd (at most the last 3 epochs back:
    an epoch taken without a record, a bootstrap or a reclaim, has none)."""
    for e in range(epoch, max(0, epoch - 3), -1):
        record = await lease.get_json(f"failovers/{e:010d}")
        if record:
            keys = ("kind", "from", "to", "epoch", "rto_seconds", "rpo_seconds", "aborted")
            return {k: record.get(k) for k in keys} | {"at": record["timeline"].get("acquired")}
    return None


def _postgres_url(cfg: AgentConfig, region: str) -> str | None:
    urls = cfg.failover.peer_probes.get(region, [])
    return next((u for u in urls if u.startswith("postgres")), None)


def _cmd_move(args: argparse.Namespace) -> int:
    from agent.coordination import switchover

    cfg = load_config(args.config)
    if cfg.region != args.to:
        print(
            f"dragent: {args.config} is region {cfg.region}'s config, not {args.to}'s",
            file=sys.stderr,
        )
        return 2
    record = asyncio.run(_move(cfg, args))
    print("\n".join(switchover.describe(record)))
    return 0 if not record["errors"] else 1


async def _move(cfg: AgentConfig, args: argparse.Namespace) -> dict[str, Any]:
    from agent.coordination import switchover
    from agent.coordination.lease import EtcdLease

    lease = EtcdLease(cfg.etcd, cfg.region, cfg.failover.lease_ttl)
    try:
        view = await lease.view()
    finally:
        await lease.aclose()
    old = view.leader or view.last_leader
    old_dsn = args.old_dsn or (_postgres_url(cfg, old) if old else None)
    return await switchover.run(
        cfg, old_dsn=old_dsn, planned=args.planned, force=getattr(args, "force", False)
    )


def _cmd_failback(args: argparse.Namespace) -> int:
    from agent.coordination.failback import LocalCluster, reseed

    cfg = load_config(args.config)
    f = cfg.failover
    if f.postgres_data_dir is None or f.dsn is None:
        raise DragentError(
            f"{args.config}: failover.postgres_data_dir and failover.postgres_dsn are needed"
        )
    source = args.source_dsn or asyncio.run(_leader_dsn(cfg))
    cluster = LocalCluster(f.postgres_data_dir, f.postgres_bin_dir, f.postgres_os_user, f.dsn)
    how = asyncio.run(reseed(cluster, source, f.dsn))
    print(f"{cfg.region}: re-seeded as a standby of the leader ({how})")
    return 0


async def _leader_dsn(cfg: AgentConfig) -> str:
    from agent.coordination.lease import EtcdLease

    lease = EtcdLease(cfg.etcd, cfg.region, cfg.failover.lease_ttl)
    try:
        view = await lease.view()
    finally:
        await lease.aclose()
    dsn = _postgres_url(cfg, view.leader) if view.leader else None
    if dsn is None:
        raise DragentError(
            f"no postgresql probe URL for the leader {view.leader!r}", hint="pass --source-dsn"
        )
    return dsn


def _cmd_ha(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    out = asyncio.run(_ha(cfg, args.action, args.why))
    json.dump(out, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
    return 0


async def _ha(cfg: AgentConfig, action: str, why: str) -> dict[str, Any]:
    from agent.coordination.lease import EtcdLease

    lease = EtcdLease(cfg.etcd, cfg.region, cfg.failover.lease_ttl)
    try:
        if action != "status":
            await lease.set_paused(action == "pause", why)
        view = await lease.view()
        health = {}
        for peer in [cfg.region, *(p.name for p in cfg.peers)]:
            health[peer] = await lease.get_json(f"health/{peer}")
        return {
            "leader": view.leader,
            "epoch": view.epoch,
            "paused": view.paused,
            "last_failover": view.last_failover,
            "last_change": await _last_change(lease, view.epoch),
            "health": health,
        }
    finally:
        await lease.aclose()
