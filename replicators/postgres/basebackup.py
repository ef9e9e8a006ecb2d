"""Base backups in the vault: ``pg_basebackup``'s tar stream, stored incrementally.

Vault layout (docs/vault-layout.md, "PostgreSQL base backups")::

    backups/<stream>/<id>/pack-<n:08d>.seg   n = 1, 2, ...: the chunks new in this backup
    backups/<stream>/<id>/manifest.seg       written last: what the backup is

``<id>`` is the UTC start time ``YYYYMMDDTHHMMSSZ``, so listing orders backups
by age. Every object is a sealed segment (zstd, AES-256-GCM, Merkle root)
whose stream is ``<stream>:backup:<id>`` and whose seq is the pack number (0
for the manifest). A backup without a manifest is incomplete and never used.

The tar stream is cut into content-defined chunks; the manifest (``version``
2) lists them in order, each naming a pack (possibly one of the previous
backup's: only chunks of the newest complete backup are reused, the rule the
garbage collector relies on) with its offset, length and SHA-256; and each
pack with its size and Merkle root. ``replicators/postgres/backupchunks.py``
has the chunk sizes, the packs, the dedupe rule and why it is safe.
``backup_keys`` names every object a backup needs.

Manifests without a ``version`` (the first format) list ``parts`` instead:
``part-<n:08d>.seg``, the tar stream cut every ``backup_part_bytes``, in order.
They are still read and restored; new backups are never written that way.

The tar comes from ``pg_basebackup -D - -Ft -X fetch``: self-contained (the
WAL needed for consistency is inside) and with PostgreSQL's own
``backup_manifest``, which ``pg_verifybackup`` checks after extraction. The
stream is never held in memory whole: a pack at a time when taken, a few
packs when extracted.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replicators import logs
from replicators.errors import IntegrityError, NotFound, SourceError
from replicators.keys import KeyProvider, unseal
from replicators.postgres import lsn as L
from replicators.postgres import pgtools
from replicators.postgres.backupchunks import (
    CHUNKER,
    PREFETCH,
    ChunkRef,
    Packer,
    backup_prefix,
    chunk_blocks,
    parse_pack_key,
    seal_put,
    sealed_name,
)
from replicators.postgres.options import PostgresOptions
from replicators.store import ObjectStore

__all__ = [
    "BackupManifest",
    "backup_keys",
    "backup_prefix",
    "choose_backup",
    "extract_backup",
    "list_backups",
    "sealed_name",
    "take_backup",
]

_START = re.compile(r"write-ahead log start point: ([0-9A-F]+/[0-9A-F]+) on timeline (\d+)")
_END = re.compile(r"write-ahead log end point: ([0-9A-F]+/[0-9A-F]+)")
_READ = 4 << 20  # bytes of the tar stream cut at a time


@dataclass(frozen=True)
class BackupManifest:
    """What a backup is. ``bytes`` is the tar stream's length (the backup's logical
    size); ``parts`` the sealed objects holding it: in version 1 the tar stream's
    parts in order, in version 2 the packs ``chunks`` name (each ``{key, size, stored,
    root}``; a pack may be in an earlier backup's prefix). ``stored`` is what this
    backup shipped: the sealed size of the objects in its own prefix."""

    id: str
    stream: str
    timeline: int
    start_lsn: int
    end_lsn: int
    start_time: float
    end_time: float
    parts: list[dict[str, Any]]
    bytes: int
    version: int = 1
    chunks: Sequence[ChunkRef] = field(default=(), repr=False)
    chunker: str = ""

    @property
    def stored(self) -> int:
        """Sealed bytes newly shipped by this backup (its own parts or packs)."""
        own = backup_prefix(self.stream, self.id)
        return sum(p.get("stored", 0) for p in self.parts if p["key"].startswith(own))

    def to_json(self) -> bytes:
        d: dict[str, Any] = {
            "id": self.id,
            "stream": self.stream,
            "timeline": self.timeline,
            "start_lsn": L.format_lsn(self.start_lsn),
            "end_lsn": L.format_lsn(self.end_lsn),
            "start_time": self.start_time,
            "end_time": self.end_time,
            "bytes": self.bytes,
        }
        if self.version == 1:
            d["parts"] = self.parts
        else:
            d.update(
                version=self.version,
                chunker=self.chunker,
                packs=self.parts,
                chunks=[list(c) for c in self.chunks],
            )
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> BackupManifest:
        """``to_json`` reversed. Raises ``IntegrityError`` naming what is malformed (the
        manifest comes out of a verified segment: a bad one is never retried)."""
        try:
            d = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise IntegrityError(f"not JSON: {exc}", where="backup manifest") from None
        try:
            return cls._checked(d)
        except ValueError as exc:
            raise IntegrityError(str(exc), where="backup manifest") from None

    @classmethod
    def _checked(cls, d: Any) -> BackupManifest:
        common = {"id", "stream", "timeline", "start_lsn", "end_lsn", "start_time"}
        common |= {"end_time", "bytes"}
        version = d.get("version", 1) if isinstance(d, dict) else 1
        v2 = {"version", "chunker", "packs", "chunks"}
        names = common | ({"parts"} if version == 1 else v2 if version == 2 else {"version"})
        if not isinstance(d, dict) or set(d) != names or type(version) is not int:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"expected the fields {sorted(names)}, got {got}")
        if not (isinstance(d["id"], str) and isinstance(d["stream"], str)):
            raise ValueError("id and stream must be strings")
        if not (isinstance(d["start_lsn"], str) and isinstance(d["end_lsn"], str)):
            raise ValueError("start_lsn and end_lsn must be LSNs (X/Y)")
        start, end = L.parse_lsn(d["start_lsn"]), L.parse_lsn(d["end_lsn"])
        if not _uint(d["timeline"], 32) or d["timeline"] == 0 or start > end:
            raise ValueError(f"timeline {d['timeline']!r:.40} or WAL range {start}..{end}")
        if not (_finite(d["start_time"]) and _finite(d["end_time"])):
            raise ValueError("start_time and end_time must be times")
        head = {k: d[k] for k in common} | {"start_lsn": start, "end_lsn": end}
        if version == 1:
            parts = d["parts"]
            if not isinstance(parts, list) or not all(_part(p) for p in parts):
                raise ValueError("parts must be a list of {key, size, root}")
            if not _uint(d["bytes"], 64) or d["bytes"] != sum(p["size"] for p in parts):
                raise ValueError(f"bytes {d['bytes']!r:.40} is not the sum of the parts' sizes")
            return cls(**head, parts=parts)
        packs, chunks = _packs(d), _chunks_of(d["chunks"], d["packs"])
        if not _uint(d["bytes"], 64) or d["bytes"] != sum(c.length for c in chunks):
            raise ValueError(f"bytes {d['bytes']!r:.40} is not the sum of the chunks' lengths")
        if not isinstance(d["chunker"], str):
            raise ValueError("chunker must name the chunking parameters")
        return cls(**head, parts=packs, version=2, chunks=chunks, chunker=d["chunker"])


def _packs(d: dict[str, Any]) -> list[dict[str, Any]]:
    """A version 2 manifest's packs: each a pack of this stream, of this backup or an
    earlier one (ids are times: an earlier one sorts before), named once."""
    packs = d["packs"]
    if not isinstance(packs, list) or not all(_part(p) for p in packs):
        raise ValueError("packs must be a list of {key, size, stored, root}")
    for p in packs:
        stream, backup_id, _ = parse_pack_key(p["key"])
        if stream != d["stream"] or backup_id > d["id"]:
            raise ValueError(f"pack {p['key']} is not of this stream, or of a later backup")
    if len({p["key"] for p in packs}) != len(packs):
        raise ValueError("a pack is listed twice")
    return packs


def _chunks_of(raw: Any, packs: list[dict[str, Any]]) -> list[ChunkRef]:
    """A version 2 manifest's chunks, each [pack, offset, length, sha256 hex] inside a
    listed pack; every listed pack is used (``backup_keys`` names no more than needed)."""
    if not isinstance(raw, list):
        raise ValueError("chunks must be a list")
    out, used = [], set()
    for c in raw:
        if not (isinstance(c, list) and len(c) == 4 and all(_uint(v, 64) for v in c[:3])):
            raise ValueError(f"chunk {c!r:.80} is not [pack, offset, length, id]")
        pack, offset, length, hex_id = c
        if pack >= len(packs):
            raise ValueError(f"chunk {c!r:.80} names no pack (there are {len(packs)})")
        if length == 0 or offset + length > packs[pack]["size"]:
            raise ValueError(f"chunk {c!r:.80} is not inside its pack")
        if not (isinstance(hex_id, str) and re.fullmatch("[0-9a-f]{64}", hex_id)):
            raise ValueError(f"chunk {c!r:.80}: its id is not a SHA-256")
        out.append(ChunkRef(pack, offset, length, hex_id))
        used.add(pack)
    if len(used) != len(packs):
        raise ValueError("a listed pack holds none of the backup's chunks")
    return out


def _uint(value: Any, bits: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << bits


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _part(p: Any) -> bool:
    """Is ``p`` a part or pack as ``take_backup`` lists it (``stored`` is informative)?"""
    return (
        isinstance(p, dict)
        and isinstance(p.get("key"), str)
        and _uint(p.get("size"), 64)
        and _uint(p.get("stored", 0), 64)
        and isinstance(p.get("root"), str)
        and re.fullmatch("[0-9a-f]{32}", p["root"]) is not None
    )


def backup_keys(manifest: BackupManifest) -> set[str]:
    """Every vault key ``manifest``'s backup needs to be restored: its manifest and every
    part or pack it reads, in whatever backup's prefix (the garbage collector keeps
    the union of these over the backups it retains)."""
    own = backup_prefix(manifest.stream, manifest.id) + "manifest.seg"
    return {own} | {p["key"] for p in manifest.parts}


def backups_read(manifest: BackupManifest) -> set[str]:
    """The ids of the backups whose packs ``manifest`` reads (its own included)."""
    prefix = backup_prefix(manifest.stream)
    return {p["key"][len(prefix) :].split("/", 1)[0] for p in manifest.parts}


async def take_backup(
    options: PostgresOptions,
    stream: str,
    store: ObjectStore,
    keys: KeyProvider,
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> BackupManifest:
    """Run ``pg_basebackup`` against the primary and store it in the vault, shipping
    only the chunks the newest complete backup of ``stream`` does not hold.

    Raises ``SourceError`` if ``pg_basebackup`` fails (nothing partial is ever
    used: the manifest is written only after every pack). Not idempotent by
    design: each call makes a new backup with a new id.
    """
    try:
        backups = await list_backups(store, keys, stream)
    except IntegrityError as exc:  # a damaged manifest must not stop new backups: ship whole
        logs.get("postgres.backup", stream=stream).warning(
            "backup_without_dedupe", reason=str(exc)[:400]
        )
        backups = []
    base = backups[-1] if backups else None  # the dedupe rule: the newest complete one only
    started = time.time()
    backup_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    prefix = backup_prefix(stream, backup_id)
    reuse = (
        base is not None
        and base.version == 2
        and base.chunker == CHUNKER.params
        and len(backups_read(base)) < options.backup_full_every
    )
    packer = Packer(
        store, keys, stream, backup_id, int(options.backup_part_bytes),
        (base.parts, base.chunks) if base is not None and reuse else None,
    )  # fmt: skip
    conninfo, env = pgtools.conninfo_and_env(options.dsn.reveal())
    argv = ["-d", conninfo, "-D", "-", "-Ft", "-X", "fetch", "-c", "fast", "-v"]
    proc = await asyncio.create_subprocess_exec(
        *pgtools.command(options, "pg_basebackup", *argv),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd="/",
        env=env,
        start_new_session=True,  # _stop kills the group: runuser and pg_basebackup
    )
    assert proc.stdout is not None and proc.stderr is not None
    err_task = asyncio.create_task(proc.stderr.read())
    cutter = CHUNKER.cutter()
    total = 0
    try:
        async for block in _blocks(proc.stdout, _READ):
            for piece in await asyncio.to_thread(cutter.feed, block):
                await packer.add(piece)
            total += len(block)
            if on_bytes:
                on_bytes(len(block))
        for piece in cutter.finish():
            await packer.add(piece)
        await packer.close()
        await proc.wait()
        err = (await err_task).decode(errors="replace")
    except BaseException:
        err_task.cancel()
        await asyncio.gather(err_task, return_exceptions=True)
        if proc.returncode is None:  # a failed upload: stop pg_basebackup, never block on it
            await _stop(proc)
        raise
    if proc.returncode:
        raise SourceError(f"pg_basebackup failed (exit {proc.returncode}): {err.strip()[-800:]}")
    start, end = _START.search(err), _END.search(err)
    if not start or not end:
        raise SourceError(f"pg_basebackup did not report its WAL range: {err.strip()[-400:]}")
    await packer.check_reused()
    manifest = BackupManifest(
        id=backup_id,
        stream=stream,
        timeline=int(start.group(2)),
        start_lsn=L.parse_lsn(start.group(1)),
        end_lsn=L.parse_lsn(end.group(1)),
        start_time=started,
        end_time=time.time(),
        parts=packer.packs,
        bytes=total,
        version=2,
        chunks=packer.chunks,
        chunker=CHUNKER.params,
    )
    await seal_put(
        store,
        keys,
        prefix + "manifest.seg",
        sealed_name(stream, backup_id),
        0,
        manifest.to_json(),
        source_time=manifest.end_time,
    )
    return manifest


async def _blocks(reader: asyncio.StreamReader, size: int) -> AsyncIterator[bytes]:
    while True:
        try:
            chunk = await reader.readexactly(size)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                yield exc.partial
            return
        yield chunk


async def list_backups(store: ObjectStore, keys: KeyProvider, stream: str) -> list[BackupManifest]:
    """Every complete backup of ``stream``, oldest first; manifests fully verified."""
    out = []
    async for info in store.list(backup_prefix(stream)):
        if info.key.endswith("/manifest.seg"):
            backup_id = info.key.split("/")[-2]
            blob = await store.get(info.key)
            name = sealed_name(stream, backup_id)
            opened = await unseal(blob, keys, expect_stream=name, expect_seq=0)
            if len(opened.records) != 1:
                why = f"{len(opened.records)} records, expected 1"
                raise IntegrityError(f"{info.key}: manifest segment holds {why}")
            manifest = BackupManifest.from_json(opened.records[0])
            if manifest.id != backup_id or manifest.stream != stream:
                raise IntegrityError(f"{info.key}: manifest names another backup")
            out.append(manifest)
    return sorted(out, key=lambda m: m.start_time)


def choose_backup(
    backups: list[BackupManifest],
    *,
    before_time: float | None = None,
    before_lsn: int | None = None,
) -> BackupManifest:
    """The newest backup that ends before the target (a time or an LSN); raises ``NotFound``."""
    usable = [
        b
        for b in backups
        if (before_time is None or b.end_time <= before_time)
        and (before_lsn is None or b.end_lsn <= before_lsn)
    ]
    if not usable:
        raise NotFound(
            "no base backup in the vault ends before the requested point: " + _earliest(backups)
        )
    return usable[-1]


def _earliest(backups: list[BackupManifest]) -> str:
    if not backups:
        return "the vault holds no base backup of this stream (take one: dragent backup postgres)"
    first = min(backups, key=lambda b: b.end_time)
    when = dt.datetime.fromtimestamp(first.end_time, dt.UTC).isoformat(timespec="seconds")
    return f"the earliest restorable point is {when} (LSN {L.format_lsn(first.end_lsn)})"


async def extract_backup(
    options: PostgresOptions,
    store: ObjectStore,
    keys: KeyProvider,
    manifest: BackupManifest,
    data_dir: Path,
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Fetch, verify and untar a backup into ``data_dir`` (created, owned by the PostgreSQL
    user), then check it with ``pg_verifybackup``. Parts or packs are fetched
    ``PREFETCH`` ahead and the tar stream written in order; every pack is checked
    (seal, size, Merkle root) and every chunk (SHA-256). Raises ``IntegrityError`` on
    anything that fails verification, ``SourceError`` if tar or pg_verifybackup fail."""
    pgtools.give_to_owner(options, data_dir)
    tar = await asyncio.create_subprocess_exec(
        *pgtools.owner_command(options, "tar", "-x", "-f", "-", "-C", str(data_dir)),
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # _stop kills the group: runuser and tar
    )
    assert tar.stdin is not None and tar.stderr is not None
    if manifest.version == 1:
        blocks = _part_blocks(store, keys, manifest)
    else:
        blocks = chunk_blocks(store, keys, manifest.stream, manifest.parts, manifest.chunks)
    try:
        async with contextlib.aclosing(blocks):
            async for views in blocks:
                for view in views:
                    tar.stdin.write(view)
                await tar.stdin.drain()
                if on_bytes:
                    on_bytes(sum(len(v) for v in views))
        tar.stdin.close()
        err = await tar.stderr.read()
        if await tar.wait():
            raise SourceError(f"tar failed extracting backup {manifest.id}: {err.decode()[-400:]}")
    finally:
        if tar.returncode is None:
            await _stop(tar)
    await pgtools.run(options, "pg_verifybackup", str(data_dir))


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Kill ``proc``'s process group (it was started in a session of its own) and wait.
    When root, ``proc`` is runuser: killing it alone would leave the program under it
    holding the pipes, and asyncio's ``wait`` waits for the pipes to close too."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


async def _part_blocks(
    store: ObjectStore, keys: KeyProvider, manifest: BackupManifest
) -> AsyncIterator[list[memoryview]]:
    """A version 1 backup's parts, in order, fetched ``PREFETCH`` ahead."""
    pending: list[asyncio.Task[bytes]] = []
    seqs = iter(range(1, len(manifest.parts) + 1))
    try:
        while True:
            while len(pending) < PREFETCH and (seq := next(seqs, None)) is not None:
                pending.append(asyncio.create_task(_fetch_part(store, keys, manifest, seq)))
            if not pending:
                return
            yield [memoryview(await pending.pop(0))]  # in order; PREFETCH parts in memory
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _fetch_part(
    store: ObjectStore, keys: KeyProvider, manifest: BackupManifest, seq: int
) -> bytes:
    part = manifest.parts[seq - 1]
    blob = await store.get(part["key"])
    name = sealed_name(manifest.stream, manifest.id)
    opened = await unseal(blob, keys, expect_stream=name, expect_seq=seq)
    if (
        len(opened.records) != 1
        or len(opened.records[0]) != part["size"]
        or opened.root.hex() != part["root"]
    ):
        raise IntegrityError(f"backup part {part['key']}: differs from the backup's manifest")
    return opened.records[0]
