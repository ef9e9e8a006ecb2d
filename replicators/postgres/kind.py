"""The ``postgres`` stream kind: WAL streaming, base backups, warm standby, PITR.

- active side: ``source`` streams WAL from a physical slot per destination
  (``walsource.WalSource``); ``background`` takes a base backup into every
  destination vault that has none of the primary's timeline (a new stream,
  or a promotion since), and every ``backup_every`` (when set).
- passive side: ``target`` rebuilds WAL files into the spool
  (``spool.WalSpool``) that the standby's restore_command serves from.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from replicators import logs
from replicators.errors import SourceError
from replicators.paths import StreamPaths
from replicators.postgres import gaps, gc, pgmetrics
from replicators.postgres import lsn as L
from replicators.postgres.basebackup import BackupManifest, list_backups, take_backup
from replicators.postgres.gaps import Gap, GapBook
from replicators.postgres.guard import StandbyMonitor, SyncGuard
from replicators.postgres.options import PostgresOptions
from replicators.postgres.spool import WalSpool
from replicators.postgres.walsource import WalSource, slot_name
from replicators.registry import Background
from replicators.settings import RetentionConfig
from replicators.vault import open_vault

if TYPE_CHECKING:
    from replicators.settings import AgentSettings, PeerSettings, StreamSettings
    from replicators.stream import Source, Target

KIND = "postgres"


def options_of(stream: StreamSettings) -> PostgresOptions:
    assert stream.postgres is not None  # the configuration requires the table
    return stream.postgres


def spool_dir(stream: StreamSettings, state_dir: Path) -> Path:
    return options_of(stream).spool_dir or state_dir / "spool"


def gap_book(stream: StreamSettings, agent: AgentSettings, peer: PeerSettings) -> GapBook:
    return GapBook(agent.data_dir / gaps.DIRECTORY, stream.name, peer.name)


def source(
    stream: StreamSettings, agent: AgentSettings, peer: PeerSettings, state_dir: Path
) -> Source:
    return WalSource(options_of(stream), peer.name, stream.name, gap_book(stream, agent, peer))


def target(stream: StreamSettings, agent: AgentSettings, state_dir: Path) -> Target:
    return WalSpool(spool_dir(stream, state_dir))


TIMELINE = "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"


def backup_due(
    newest: BackupManifest | None,
    timeline: int,
    now: float,
    every: float,
    open_gaps: list[Gap] | None = None,
) -> str | None:
    """Why a base backup must be taken now (None: the newest one serves). Pure.

    A vault needs one whose timeline is the primary's: after a promotion (a failover,
    a switchover, a failback) the backups there are of another history and no WAL in
    this vault joins them to the present, so a restore or a drill in the new direction
    has nothing to start from. Likewise after a gap in the WAL log (``open_gaps``: gaps
    no base backup covers yet). ``every`` > 0 also renews it on a schedule."""
    if newest is None:
        return "no base backup in the vault"
    after = [g for g in open_gaps or [] if g.end > newest.start_lsn]
    if after:
        return (
            f"the WAL log has a gap ({L.format_lsn(after[0].start)} to "
            f"{L.format_lsn(after[0].end)}) after the newest base backup"
        )
    if newest.timeline != timeline:
        return (
            f"the newest base backup is of timeline {newest.timeline}, the primary's is {timeline}"
        )
    if every > 0 and now - newest.start_time >= every:
        age = now - newest.start_time
        return f"the newest base backup is {age:.0f}s old (backup_every {every:g}s)"
    return None


class BackupSchedule:
    """Takes a base backup into one peer's vault whenever ``backup_due`` says so: at once
    after a role change that left the vault without a usable one, then every
    ``backup_every`` (when set). Each ``sync_once`` takes at most one backup."""

    def __init__(self, stream: StreamSettings, peer: PeerSettings, book: GapBook) -> None:
        self.stream = stream
        self.peer = peer
        self.book = book
        self.options = options_of(stream)
        self.newest: BackupManifest | None = None
        self.log = logs.get("postgres.backup", stream=stream.name, peer=peer.name)

    async def recover(self) -> None:
        async with open_vault(self.peer.vault, self.peer.keys) as (vault, keys):
            backups = await list_backups(vault.store, keys, self.stream.name)
        self.newest = backups[-1] if backups else None

    async def sync_once(self, stop: asyncio.Event) -> bool:
        open_gaps = gaps.uncovered(self.book.gaps())
        if open_gaps and self.newest is not None:
            self._cover(self.newest)  # a backup stored before the gap was recorded
            open_gaps = gaps.uncovered(self.book.gaps())
        why = backup_due(
            self.newest, await self._timeline(), time.time(), self.options.backup_every,
            open_gaps,
        )  # fmt: skip
        if why is None:
            return False
        self.log.info("taking a base backup", reason=why)
        async with open_vault(self.peer.vault, self.peer.keys) as (vault, keys):
            manifest = await take_backup(self.options, self.stream.name, vault.store, keys)
        self.newest = manifest
        self.log.info("base backup stored", id=manifest.id, bytes=manifest.bytes)
        self._cover(manifest)
        return True

    def _cover(self, backup: BackupManifest) -> None:
        for gap in gaps.cover(self.book.directory, self.book.gaps(), backup.id, backup.start_lsn):
            self.log.info("WAL gap covered by a base backup", gap=gap.id, backup=backup.id)
        self.book.forget()

    async def _timeline(self) -> int:
        conn = await asyncpg.connect(self.options.dsn.reveal(), timeout=10)
        try:
            return int(await conn.fetchval(TIMELINE))
        finally:
            await conn.close()


def retention_of(stream: StreamSettings, agent: AgentSettings) -> RetentionConfig:
    """The stream's ``retention`` table, else the agent's, else the defaults."""
    own = getattr(stream, "retention", None) or getattr(agent, "retention", None)
    return own if own is not None else RetentionConfig()


class VaultGc:
    """Collects this region's own vault for one stream every ``gc_every``
    (``replicators.postgres.gc``), in either role: never past what this region's standby
    has applied, nothing of its segments while a standby here has no position yet."""

    def __init__(self, stream: StreamSettings, agent: AgentSettings) -> None:
        self.stream = stream
        self.agent = agent
        self.policy = retention_of(stream, agent)
        self.last: gc.GcResult | None = None
        self.first_seen: float | None = None
        """The first pass ever over this vault (its history is at least this old)."""
        self.log = logs.get("postgres.gc", stream=stream.name)
        pgmetrics.track_gc(self)

    async def recover(self) -> None:
        before = await asyncio.to_thread(gc.latest, self.agent.data_dir)
        seen = before.get(self.stream.name, {}).get("first_seen")
        self.first_seen = float(seen) if isinstance(seen, int | float) else None

    async def sync_once(self, stop: asyncio.Event) -> bool:
        return bool((await self.run()).deleted)

    async def run(
        self, *, dry_run: bool = False, on_delete: Callable[[str, str], None] | None = None
    ) -> gc.GcResult:
        """One pass; kept (``last``) and recorded for the evidence log unless a dry run."""
        spool = spool_dir(self.stream, StreamPaths(self.agent.data_dir, self.stream.name).target)
        applied, hold = None, False
        if spool.exists():
            state = await WalSpool(spool).state()
            applied, hold = (state.ref, False) if state else (None, True)
        async with open_vault(self.agent.vault, self.agent.keys) as (vault, keys):
            result = await gc.collect(
                vault.store, keys, self.stream.name, self.policy, applied=applied,
                hold_segments=hold, dry_run=dry_run, on_delete=on_delete,
            )  # fmt: skip
        if dry_run:
            return result
        self.last = result
        self.first_seen = min(self.first_seen or result.at, result.at)
        await asyncio.to_thread(gc.record, self.agent.data_dir, result)
        if result.deleted or result.locked:
            self.log.info(
                "vault collected", deleted=result.deleted, bytes=result.bytes_deleted,
                locked=len(result.locked), window=round(result.recovery_window),
            )  # fmt: skip
        return result


def background(
    stream: StreamSettings, agent: AgentSettings, role: str, state_dir: Path
) -> list[Background]:
    """Active: base-backup schedules, the zero-loss guard. Passive: the standby monitor.
    Both: the collector of this region's own vault (when retention is enabled)."""
    options = options_of(stream)
    policy = retention_of(stream, agent)
    collector = []
    if policy.enabled:
        collector = [Background("vault-gc", VaultGc(stream, agent), policy.gc_every)]
    if role != "active":
        spool = spool_dir(stream, StreamPaths(agent.data_dir, stream.name).target)
        monitor = StandbyMonitor(options, stream.name, spool)
        return [Background("standby-monitor", monitor, 2.0), *collector]
    jobs = list(collector)
    for peer in agent.peers:
        every = min(options.backup_every, 60.0) if options.backup_every > 0 else 60.0
        job = BackupSchedule(stream, peer, gap_book(stream, agent, peer))
        jobs.append(Background(f"backup-{peer.name}", job, every))
        if options.synchronous:
            slots = frozenset(slot_name(options, p.name) for p in agent.peers)
            guard = SyncGuard(options, stream.name, slot_name(options, peer.name), slots)
            jobs.append(Background(f"sync-guard-{peer.name}", guard, 1.0))
    return jobs


async def verify(
    stream: StreamSettings, agent: AgentSettings, *, deep: bool = False, repair: bool = False
) -> dict[str, Any]:
    """Compare ``dsn`` with ``verify_dsn`` table by table (verifiers/postgres.py); returns
    the unsigned report. Every comparison is complete (``deep`` changes nothing); repair
    is not done here: a differing standby is rebuilt with ``dragent standby init``."""
    from verifiers.postgres import compare

    options = options_of(stream)
    if repair:
        raise SourceError("postgres verify cannot repair: rebuild the copy (dragent standby init)")
    if options.verify_dsn is None:
        raise SourceError(f"stream {stream.name}: set [streams.postgres] verify_dsn to verify")
    report = await compare(
        options.dsn.reveal(), options.verify_dsn.reveal(), list(options.verify_tables) or None
    )
    return {**report, "stream": stream.name, "region": agent.region}
