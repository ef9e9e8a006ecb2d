"""The ``dragent`` command line. Exit codes: 0 ok, 1 failure, 2 bad configuration or usage."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from pathlib import Path

from agent import __version__
from agent.config import ConfigError, load_config
from agent.jsonout import print_json
from replicators import logs

# Each module adds its commands with ``register(subparsers)``.
COMMAND_MODULES = (
    "agent.lab.cli",
    "agent.cli_postgres",
    "agent.cli_artifacts",
    "agent.cli_objects",
    "agent.cli_dr",
    "agent.cli_verify",
    "agent.cli_failover",
    "agent.cli_keys",
)


def _cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon import run_agent

    return asyncio.run(run_agent(Path(args.config), args.instance, args.listen))


def _cmd_config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.file)
    print(
        f"{args.file}: ok (region {cfg.region}, role {cfg.role}, "
        f"{len(cfg.streams)} streams, {len(cfg.peers)} peers)"
    )
    from agent.doctor import lock_warnings

    for warning in lock_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    if not args.online:
        return 0
    from agent.doctor import run_checks

    results = asyncio.run(run_checks(cfg))
    if args.json:
        print_json({"checks": [c.to_json() for c in results]})
    else:
        print("\n".join(c.line() for c in results))
    failed = [c for c in results if not c.ok]
    if failed and not args.json:
        print(f"{len(failed)} of {len(results)} checks failed", file=sys.stderr)
    return 1 if failed else 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from replicators.keys import generate_key_file, revoke_key_version, rotate_key_file

    path = Path(args.file)
    if args.action == "revoke":
        if not args.key_id:
            print("dragent keys revoke FILE KEY_ID: which version?", file=sys.stderr)
            return 2
        done = revoke_key_version(path, args.key_id)
        print(f"{path}: key {args.key_id} {'revoked' if done else 'was already revoked'}")
        return 0
    key_id = generate_key_file(path) if args.action == "generate" else rotate_key_file(path)
    print(f"{path}: current key {key_id}")
    return 0


def _cmd_vault(args: argparse.Namespace) -> int:
    from agent.vaultcmd import vault_ls, vault_verify

    cfg = load_config(args.config)
    if args.action == "ls":
        return asyncio.run(vault_ls(cfg, args.stream, args.json))
    if args.action == "gc":
        from agent.vaultgc import vault_gc

        return asyncio.run(vault_gc(cfg, args.stream, args.json, dry_run=args.dry_run))
    return asyncio.run(vault_verify(cfg, args.stream, args.json, repair=args.repair))


def _cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo

    return asyncio.run(run_demo(Path(args.dir).resolve(), seconds=args.seconds, keep=args.keep))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dragent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dragent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent of one region")
    run.add_argument("--config", required=True, help="the region's TOML file")
    run.add_argument(
        "--instance",
        help="this agent's name in its region's group ([group] enabled; or DRAGENT_INSTANCE)",
    )
    run.add_argument("--listen", help="HOST:PORT of the HTTP endpoint, instead of [http] listen")
    run.set_defaults(func=_cmd_run)

    config = sub.add_parser("config", help="configuration tools")
    csub = config.add_subparsers(dest="action", required=True)
    check = csub.add_parser("check", help="validate a configuration file without starting")
    check.add_argument("file")
    check.add_argument(
        "--online",
        action="store_true",
        help="also reach every vault, key, etcd member, database and DNS server it names",
    )
    check.add_argument("--json", action="store_true", help="with --online: JSON on stdout")
    check.set_defaults(func=_cmd_config_check)

    keys = sub.add_parser("keys", help="local key files (the lab's key-encryption keys)")
    keys.add_argument("action", choices=["generate", "rotate", "revoke"])
    keys.add_argument("file")
    keys.add_argument("key_id", nargs="?", help="revoke: the compromised version (re-key first)")
    keys.set_defaults(func=_cmd_keys)

    vault = sub.add_parser("vault", help="inspect and verify this region's vault")
    vault.add_argument(
        "action",
        choices=["ls", "verify", "gc"],
        help="gc: delete what no restore point of the recovery window needs ([retention])",
    )
    vault.add_argument("--config", required=True)
    vault.add_argument("--stream", required=True)
    vault.add_argument("--json", action="store_true")
    vault.add_argument(
        "--repair",
        action="store_true",
        help="verify: re-ship damaged or missing segments of a postgres stream from its source",
    )
    vault.add_argument(
        "--dry-run", action="store_true", help="gc: say what would be deleted, delete nothing"
    )
    vault.set_defaults(func=_cmd_vault)

    demo = sub.add_parser("demo", help="bring up the lab, run both agents, show the RPO")
    demo.add_argument("--dir", default=".lab-demo", help="lab directory (default .lab-demo)")
    demo.add_argument("--seconds", type=float, default=30.0, help="how long to run (default 30)")
    demo.add_argument("--keep", action="store_true", help="leave the lab running afterwards")
    demo.set_defaults(func=_cmd_demo)

    added = {m: importlib.import_module(m).register(sub) for m in COMMAND_MODULES}
    importlib.import_module("agent.chaos.cli").register(added["agent.lab.cli"])
    _describe(parser)
    return parser


def _describe(parser: argparse.ArgumentParser) -> None:
    """Give every subcommand's own ``--help`` the one-line help its parent lists for it
    (unless it has a description of its own), at every depth."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help for a in action._choices_actions}
        for name, child in action.choices.items():
            if child.description is None and helps.get(name):
                child.description = f"{helps[name][0].upper()}{helps[name][1:]}."
            _describe(child)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("logfmt", "info")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from replicators.errors import DragentError

        if isinstance(exc, DragentError):
            print(f"dragent: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
