"""``dragent config check --online``: reach every endpoint a configuration names.

A configuration can be valid and still wrong: a mistyped S3 secret, a key file
that is not the one the vault's segments were sealed with, an etcd endpoint
that does not answer. Each is found here, before the agent starts retrying,
with the endpoint named:

- each vault (this region's and every peer's): a listing with its credentials;
- this region's key: a data key wrapped and unwrapped, and the data key of the
  oldest segment of every stream in this region's vault unwrapped (the KEK
  that sealed what is there);
- each peer's key: a data key wrapped for it;
- each etcd endpoint, one at a time: a read of the coordination keys;
- every PostgreSQL DSN (``[failover]`` and each stream's): a connection and a query;
- each DNS switch with a credentials check (TSIG-signed query);
- each vault configured with ``object_lock``: the bucket has Object Lock enabled
  (``GetObjectLockConfiguration``), without which every locked PUT is refused.

Offline, ``lock_warnings`` names each vault whose ``object_lock.retain`` is shorter
than the recovery window (``[retention] window``, or a stream's own): what is written
there may be deleted before it leaves the window (docs/immutable-vault.md).

Checks run concurrently, each with a deadline; none writes anything.
Passwords never appear in what is reported (DSNs are shown as host:port/db).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from agent.config import AgentConfig
from agent.coordination.health import redact
from agent.coordination.lease import EtcdLease
from agent.evidence.locked import LockedWriter
from agent.failover_config import EtcdConfig
from agent.switch import build_switch
from replicators.keys import build_key_provider
from replicators.s3 import S3Store
from replicators.segment import read_header
from replicators.settings import KeysConfig, S3Config
from replicators.vault import open_vault

DEADLINE = 10.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}: {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


async def _run(name: str, job: Callable[[], Awaitable[str]]) -> Check:
    try:
        async with asyncio.timeout(DEADLINE):
            return Check(name, True, await job())
    except TimeoutError:
        return Check(name, False, f"no answer within {DEADLINE:g}s")
    except Exception as exc:  # every failure is reported, none raised
        return Check(name, False, f"{type(exc).__name__}: {exc}")


def _where(s3: S3Config) -> str:
    return f"{s3.endpoint or 'AWS S3'} bucket {s3.bucket}"


async def _vault(s3: S3Config) -> str:
    store = await S3Store.open(s3)
    try:
        async for _ in store.list("streams/"):
            break
    finally:
        await store.aclose()
    return "listed with its credentials"


async def _own_key(keys_cfg: KeysConfig, vault: S3Config, streams: list[str]) -> str:
    opened = 0
    async with open_vault(vault, keys_cfg) as (log, keys):
        data = await keys.data_key()
        if await keys.unwrap(data.key_id, data.wrapped) != data.plaintext:
            raise ValueError("a data key did not unwrap to itself")
        for stream in streams:
            async for ref in log.segments(stream):
                header = read_header(await log.get_segment(ref))
                await keys.unwrap(header.key_id, header.wrapped_key)
                opened += 1
                break
    return f"wraps and unwraps; opens the oldest segment of {opened} of {len(streams)} streams"


def _days(seconds: float) -> str:
    return f"{seconds / 86400:g}d" if seconds >= 86400 else f"{seconds:g}s"


def lock_warnings(cfg: AgentConfig) -> list[str]:
    """One line per vault whose ``object_lock.retain`` is shorter than the longest
    recovery window of this configuration (the agent's ``[retention]`` or a stream's):
    a version could then be deleted while a restore point of the window still needs it."""
    windows = [cfg.retention.window] + [
        s.retention.window for s in cfg.streams if s.retention is not None
    ]
    window = 0.0 if 0.0 in windows else max(windows)  # 0: keep everything, forever
    out = []
    targets = [("vault", cfg.vault)] + [(f"peers[{p.name}].vault", p.vault) for p in cfg.peers]
    for where, s3 in targets:
        lock = s3.object_lock
        if lock is None:
            continue
        if window == 0.0 or lock.retain < window:
            want = "keeps everything (window 0)" if window == 0.0 else _days(window)
            out.append(
                f"{where}.object_lock.retain: {_days(lock.retain)} is shorter than the "
                f"recovery window [retention] window ({want}): a version may be deleted "
                "while the window still needs it"
            )
    return out


async def _object_lock(s3: S3Config) -> str:
    assert s3.object_lock is not None
    store = await LockedWriter.open(s3)
    try:
        enabled = await store.lock_enabled()
    finally:
        await store.aclose()
    if not enabled:
        raise ValueError(
            "object_lock is configured but the bucket has no Object Lock (create it with "
            "ObjectLockEnabledForBucket=true): every locked write would be refused"
        )
    lock = s3.object_lock
    return f"Object Lock enabled; writes locked {lock.mode} for {_days(lock.retain)}"


async def _peer_key(keys_cfg: KeysConfig) -> str:
    keys = build_key_provider(keys_cfg)
    try:
        data = await keys.data_key()
    finally:
        await keys.aclose()
    return f"wraps a data key (key id {data.key_id})"


async def _etcd(etcd: EtcdConfig, endpoint: str, region: str) -> str:
    lease = EtcdLease(etcd.model_copy(update={"endpoints": [endpoint]}), region, 10.0)
    try:
        view = await lease.view()
    finally:
        await lease.aclose()
    return f"answers (leader {view.leader or 'none'}, epoch {view.epoch})"


async def _dsn(dsn: str) -> str:
    conn = await asyncpg.connect(dsn, timeout=DEADLINE)
    try:
        recovering = await conn.fetchval("SELECT pg_is_in_recovery()")
    finally:
        await conn.close()
    return "standby" if recovering else "primary"


def checks(cfg: AgentConfig) -> list[tuple[str, Callable[[], Awaitable[str]]]]:
    """Every check this configuration calls for, by name (no I/O yet)."""
    out: list[tuple[str, Callable[[], Awaitable[str]]]] = []
    streams = [s.name for s in cfg.streams]
    out.append((f"vault {cfg.region} ({_where(cfg.vault)})", lambda: _vault(cfg.vault)))
    out.append((f"key {cfg.region}", lambda: _own_key(cfg.keys, cfg.vault, streams)))
    for peer in cfg.peers:
        out.append((f"vault {peer.name} ({_where(peer.vault)})", _bind(_vault, peer.vault)))
        out.append((f"key for {peer.name}", _bind(_peer_key, peer.keys)))
    for name, s3 in [(cfg.region, cfg.vault), *((p.name, p.vault) for p in cfg.peers)]:
        if s3.object_lock is not None:
            out.append((f"object lock {name} ({_where(s3)})", _bind(_object_lock, s3)))
    for endpoint in cfg.etcd.endpoints:
        job = _bind(_etcd, cfg.etcd, endpoint, cfg.region)
        out.append((f"etcd {redact(endpoint)}", job))
    dsns = {}
    if cfg.failover.dsn:
        dsns["[failover] postgres_dsn"] = cfg.failover.dsn
    for s in cfg.streams:
        if s.postgres is not None:
            dsns[f"stream {s.name} dsn"] = s.postgres.dsn.reveal()
    for what, dsn in dsns.items():
        out.append((f"{what} ({redact(dsn)})", _bind(_dsn, dsn)))
    for switch_cfg in cfg.failover.switches:
        switch = build_switch(switch_cfg)
        check = getattr(switch, "check_credentials", None)
        if check is not None:
            out.append((switch.describe(), _bind(_credentials, check)))
    return out


async def _credentials(check: Callable[[], Awaitable[None]]) -> str:
    await check()
    return "credentials accepted"


def _bind(fn: Callable[..., Awaitable[str]], *args: Any) -> Callable[[], Awaitable[str]]:
    return lambda: fn(*args)


async def run_checks(cfg: AgentConfig) -> list[Check]:
    """Run every check concurrently; never raises."""
    return list(await asyncio.gather(*(_run(name, job) for name, job in checks(cfg))))
