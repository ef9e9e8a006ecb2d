"""``dragent rekey``: re-seal a stream's objects away from a compromised KEK version.

``dragent rekey --config F --stream S [--stream T ...] --from KEY_VERSION
[--peer NAME] [--jobs N] [--revoke] [--json]``: in this region's vault (or, with
``--peer``, in that peer's vault with the key this region wraps for it), every object
of the streams wrapped under ``KEY_VERSION`` is sealed again under the current version
(``agent.rekey``). Resumable: rerun the same command after an interruption. With
``--revoke``, once every named stream is complete, the version is revoked in the key
file (local keys; for AWS KMS, disable the old key and drop it from
``kms_allowed_keys``). Exit 0 when complete, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from tqdm import tqdm

from agent.config import AgentConfig, ConfigError, load_config
from agent.jsonout import print_json
from agent.rekey import Rekeyer, RekeyReport, state_path
from replicators.keys import revoke_key_version
from replicators.settings import KeysConfig, S3Config
from replicators.vault import open_vault


def _target(cfg: AgentConfig, peer: str | None, path: str) -> tuple[str, S3Config, KeysConfig]:
    if peer is None:
        return cfg.region, cfg.vault, cfg.keys
    for p in cfg.peers:
        if p.name == peer:
            return p.name, p.vault, p.keys
    raise ConfigError(path, [f"peers: no peer named {peer!r}"])


async def _rekey(args: argparse.Namespace, cfg: AgentConfig) -> list[RekeyReport]:
    name, vault_cfg, keys_cfg = _target(cfg, args.peer, args.config)
    reports = []
    async with open_vault(vault_cfg, keys_cfg) as (vault, keys):
        for stream in args.stream:
            bar = tqdm(desc=f"rekey {stream}", unit="obj", file=sys.stderr, mininterval=0.5)
            try:
                rekeyer = Rekeyer(
                    vault.store,
                    keys,
                    stream,
                    args.from_version,
                    state_path(cfg.data_dir, name, stream, args.from_version),
                    vault=name,
                    jobs=args.jobs,
                    progress=bar.update,
                    total=lambda n, bar=bar: setattr(bar, "total", n),
                )
                reports.append(await rekeyer.run())
            finally:
                bar.close()
    return reports


def _cmd_rekey(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    reports = asyncio.run(_rekey(args, cfg))
    complete = all(r.complete for r in reports)
    revoked: str | None = None
    if args.revoke and complete:
        _, _, keys_cfg = _target(cfg, args.peer, args.config)
        if keys_cfg.provider == "local":
            assert keys_cfg.key_file is not None
            revoke_key_version(keys_cfg.key_file, args.from_version)
            revoked = f"{args.from_version} revoked in {keys_cfg.key_file}"
        else:
            revoked = (
                f"not revoked here: disable KMS key {args.from_version} and remove it from "
                "[keys] kms_allowed_keys"
            )
    elif args.revoke:
        revoked = f"{args.from_version} NOT revoked: the rekey is not complete"
    if args.json:
        print_json({"reports": [r.to_json() for r in reports], "revoked": revoked})
    else:
        for r in reports:
            print("\n".join(r.lines()))
        if revoked:
            print(revoked)
    return 0 if complete else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``rekey`` to a ``dragent`` subparsers object."""
    rekey = sub.add_parser(
        "rekey", help="re-seal objects wrapped under a compromised key version (resumable)"
    )
    rekey.add_argument("--config", required=True, help="the region's TOML file")
    rekey.add_argument(
        "--stream", required=True, action="append", help="a stream (repeat for several)"
    )
    rekey.add_argument(
        "--from",
        dest="from_version",
        required=True,
        metavar="KEY_VERSION",
        help="the compromised KEK version (key id in the segment headers)",
    )
    rekey.add_argument(
        "--peer",
        metavar="NAME",
        help="re-key peer NAME's vault with the key this region wraps for it "
        "(default: this region's own vault and key)",
    )
    rekey.add_argument("--jobs", type=int, default=8, help="objects in flight (default 8)")
    rekey.add_argument(
        "--revoke",
        action="store_true",
        help="once complete, revoke the version in the key file: nothing under it opens again",
    )
    rekey.add_argument("--json", action="store_true", help="the reports as JSON on stdout")
    rekey.set_defaults(func=_cmd_rekey)
