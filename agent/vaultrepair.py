"""``dragent vault verify --repair``: re-ship a postgres stream's damaged segments.

For every run of segments that cannot be opened, or are missing (a hole in seq
within an epoch), between two readable ones, the positions it covers are
known: the previous segment's end, the next one's start
(``replicators.postgres.repair`` plans it). The WAL of that range is read again
from the source database's ``pg_wal`` with ``pg_read_binary_file`` (superuser
or ``pg_read_server_files``), checked page by page (every WAL page header names
its own address), cut into records as the WAL source writes them, sealed under
the same names (stream, epoch, seq) with the same range, and opened and decoded
again before anything is written.

Replacing breaks the vault's create-only rule once, deliberately: the only writer
that may replace a segment is this repair, and only after re-reading the
neighbours and proving the replacements continuous with them (seq and
position), and that the damaged object is still damaged (or still absent). The
damaged object is deleted, then the replacement is put create-only (a writer
racing us makes the put fail, and the run is reported unrepaired). Should the put
fail after the delete, the segment is missing, which the next ``--repair`` finds
and re-ships like any hole. A run's replacements are built in memory before any is
written (at most a few WAL files' worth for a run of a few segments).

A run is not repairable when the WAL is no longer in the source's ``pg_wal``
(``pg_ls_waldir()``), when a bound is unknown (at the start or end of the log),
or when the stream is not a postgres stream: the objects and artifacts kinds'
positions cannot be re-shipped from an unreadable segment (the positions are
named so the range can be re-copied from the source by other means).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from agent.config import AgentConfig
from replicators import lineage
from replicators.errors import AlreadyExists, IntegrityError, NotFound, StorageError
from replicators.keys import KeyProvider, unseal
from replicators.logread import LogWalk
from replicators.postgres import lsn as L
from replicators.postgres import repair as R
from replicators.postgres.spool import decode_records
from replicators.segment import SegmentHeader, seal
from replicators.stream import Applied
from replicators.vault import SegmentRef, Vault, open_vault


@dataclass
class Outcome:
    """What became of one damaged run."""

    damage: R.Damage
    repaired: bool = False
    why: str | None = None

    def describe(self) -> dict[str, Any]:
        d = self.damage
        return {
            "segments": d.keys,
            "missing": [r.key for r in d.missing],
            "covers": [d.start, d.end],
            "repaired": self.repaired,
            "why": self.why,
        }


async def repair_stream(cfg: AgentConfig, stream: str) -> list[Outcome]:
    """Find every damaged run of ``stream`` in this region's vault and repair what can be,
    reading WAL through the stream's configured ``postgres.dsn``."""
    try:
        configured = cfg.stream(stream)
    except KeyError:
        configured = None
    kind = configured.kind if configured is not None else None
    postgres = kind == "postgres"
    async with open_vault(cfg.vault, cfg.keys) as (vault, keys):
        log = LogWalk(vault, keys, stream)
        entries = [R.entry_of(c.ref, c.opened, postgres=postgres) async for c in log.check()]
        damages = R.plan(entries, postgres=postgres)
        if not damages:
            return []
        if not postgres:
            return [Outcome(d, why=_not_postgres(d, kind)) for d in damages]
        assert configured is not None and configured.postgres is not None
        try:
            conn = await asyncpg.connect(configured.postgres.dsn.reveal(), timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            return [Outcome(d, why=f"cannot reach the source database: {exc}") for d in damages]
        try:
            source = WalOnSource(conn)
            await source.refresh()
            return [await _repair(d, log, vault, keys, source) for d in damages]
        finally:
            await conn.close(timeout=5)


def _not_postgres(d: R.Damage, kind: str | None) -> str:
    what = f"a {kind} stream" if kind else "a stream this configuration does not name"
    where = f"positions from {d.start or 'the start'} to {d.end or 'the end'}"
    return (
        f"{what}: its {where} cannot be re-shipped from an unreadable segment "
        "(only a postgres stream's WAL can be read again from its source); re-copy that "
        "range from the source"
    )


class WalOnSource:
    """The source database's WAL files (``pg_ls_waldir``) and their bytes."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.files: set[str] = set()
        self.written = 0

    async def refresh(self) -> None:
        rows = await self.conn.fetch("SELECT name FROM pg_ls_waldir()")
        self.files = {r["name"] for r in rows}
        written = await self.conn.fetchval(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
            "ELSE pg_current_wal_flush_lsn() END)::text"
        )
        self.written = L.parse_lsn(written) if written else 0

    def oldest(self) -> str | None:
        names = sorted(n for n in self.files if _is_wal(n))
        return names[0] if names else None

    async def read(self, timeline: int, start: int, end: int) -> bytes:
        """WAL ``[start, end)`` (within one file) of ``timeline``. Raises ``LookupError``
        (saying why) when the source no longer holds it, ``ValueError`` when its bytes
        are not that WAL."""
        if start == end:
            return b""
        if end > self.written:
            raise LookupError(
                f"the source has written WAL only up to {L.format_lsn(self.written)}, "
                f"not to {L.format_lsn(end)}"
            )
        name = L.wal_file_name(timeline, start)
        if name not in self.files:
            raise LookupError(
                f"WAL file {name} is no longer in the source's pg_wal "
                f"(the oldest there is {self.oldest() or 'none'})"
            )
        offset, length = R.read_span(start, end)
        data = await self.conn.fetchval(
            "SELECT pg_read_binary_file($1, $2, $3, true)", f"pg_wal/{name}", offset, length
        )
        if data is None:
            raise LookupError(f"WAL file {name} was removed from the source's pg_wal")
        return R.wal_bytes(start, end, bytes(data))


def _is_wal(name: str) -> bool:
    try:
        L.parse_wal_file_name(name)
    except ValueError:
        return False
    return True


async def _repair(
    d: R.Damage, log: LogWalk, vault: Vault, keys: KeyProvider, source: WalOnSource
) -> Outcome:
    if d.problem is not None:
        return Outcome(d, why=d.problem)
    assert d.timeline is not None and d.before is not None and d.after is not None
    try:
        pieces = d.pieces()
        built = []
        for ref, (start, end) in zip(d.refs, pieces, strict=True):
            data = await source.read(d.timeline, start, end)
            built.append((ref, await _sealed(d, ref, start, end, data, keys)))
    except (LookupError, ValueError, IntegrityError) as exc:
        return Outcome(d, why=str(exc))
    try:
        await _still_damaged(d, log, vault)
        await _continuous(d, log, [(ref, h) for ref, (_, h) in built])
    except (IntegrityError, StorageError) as exc:
        return Outcome(d, why=f"not replaced: {exc}")
    missing = set(d.missing)
    try:
        for ref, (blob, _) in built:
            if ref not in missing:
                await vault.store.delete(ref.key)
            await vault.put_segment(ref, blob)
    except AlreadyExists as exc:
        return Outcome(d, why=f"another writer published it meanwhile: {exc}")
    except StorageError as exc:
        return Outcome(d, why=f"the vault refused the replacement: {exc}")
    return Outcome(d, repaired=True)


async def _sealed(
    d: R.Damage, ref: SegmentRef, start: int, end: int, data: bytes, keys: KeyProvider
) -> tuple[bytes, SegmentHeader]:
    """The replacement of ``ref``, sealed, then opened and decoded as a sink would."""
    assert d.timeline is not None
    records = R.build_records(d.timeline, start, data)
    data_key = await keys.data_key()
    blob = await asyncio.to_thread(
        seal,
        records,
        stream=ref.stream,
        epoch=ref.epoch,
        seq=ref.seq,
        start=str(start),
        end=str(end),
        first_source_time=d.first_source_time,
        last_source_time=d.last_source_time,
        data_key=data_key,
        created_at=time.time(),
    )
    opened = await unseal(
        blob, keys, expect_stream=ref.stream, expect_epoch=ref.epoch, expect_seq=ref.seq
    )
    decode_records(opened.header, opened.records)
    return blob, opened.header


async def _still_damaged(d: R.Damage, log: LogWalk, vault: Vault) -> None:
    """Refuse (``IntegrityError``) if a damaged segment became readable, or a missing one
    appeared, since the walk: somebody else repaired or wrote it."""
    for ref in d.refs:
        if ref in d.missing:
            try:
                await vault.store.stat(ref.key)
            except NotFound:
                continue
            raise IntegrityError("it appeared in the vault since the walk", where=ref.key)
        try:
            await log.open(ref)
        except IntegrityError:
            continue
        raise IntegrityError("it is readable now", where=ref.key)


async def _continuous(
    d: R.Damage, log: LogWalk, built: list[tuple[SegmentRef, SegmentHeader]]
) -> None:
    """Re-read the neighbours and check the chain before, replacements, after."""
    assert d.before is not None and d.after is not None
    before = (await log.open(d.before)).header
    after = (await log.open(d.after)).header
    if before.end != d.start or after.start != d.end:
        raise IntegrityError(
            f"the neighbours changed since the walk (now {before.end} and {after.start})",
            where=d.before.key,
        )
    last = Applied(ref=d.before, end=int(before.end), source_time=before.last_source_time)
    for ref, header in [*built, (d.after, after)]:
        lineage.check_continuity(last, ref, header)
        last = Applied(ref=ref, end=int(header.end), source_time=header.last_source_time)
