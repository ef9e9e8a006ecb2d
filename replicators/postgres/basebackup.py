"""Base backups in the vault: ``pg_basebackup``'s tar stream cut into sealed parts.

Vault layout (docs/vault-layout.md, "PostgreSQL base backups")::

    backups/<stream>/<id>/part-<n:08d>.seg   n = 1, 2, ...: the tar stream, in order
    backups/<stream>/<id>/manifest.seg       written last: what the backup is

``<id>`` is the UTC start time ``YYYYMMDDTHHMMSSZ``, so listing orders backups
by age. Every object is a sealed segment (zstd, AES-256-GCM, Merkle root)
whose stream is the stream's name and whose seq is the part number (0 for
the manifest); the manifest lists the parts with their sizes and Merkle
roots. A backup without a manifest is incomplete and never used.

The tar comes from ``pg_basebackup -D - -Ft -X fetch``: self-contained (the
WAL needed for consistency is inside) and with PostgreSQL's own
``backup_manifest``, which ``pg_verifybackup`` checks after extraction. The
stream is never held in memory whole: one part at a time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replicators.errors import IntegrityError, NotFound, SourceError
from replicators.keys import KeyProvider, unseal
from replicators.postgres import lsn as L
from replicators.postgres import pgtools
from replicators.postgres.options import PostgresOptions
from replicators.segment import seal
from replicators.store import ObjectStore
from verifiers.merkle import leaf_hash, merkle_root

_START = re.compile(r"write-ahead log start point: ([0-9A-F]+/[0-9A-F]+) on timeline (\d+)")
_END = re.compile(r"write-ahead log end point: ([0-9A-F]+/[0-9A-F]+)")
_PREFETCH = 4


def backup_prefix(stream: str, backup_id: str | None = None) -> str:
    return f"backups/{stream}/" + (f"{backup_id}/" if backup_id else "")


def sealed_name(stream: str, backup_id: str) -> str:
    """The stream name sealed into a backup's objects: binds every part to its backup."""
    return f"{stream}:backup:{backup_id}"


@dataclass(frozen=True)
class BackupManifest:
    id: str
    stream: str
    timeline: int
    start_lsn: int
    end_lsn: int
    start_time: float
    end_time: float
    parts: list[dict[str, Any]]
    bytes: int

    def to_json(self) -> bytes:
        d = dict(self.__dict__)
        d["start_lsn"], d["end_lsn"] = L.format_lsn(self.start_lsn), L.format_lsn(self.end_lsn)
        return json.dumps(d, sort_keys=True).encode()

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
        names = set(cls.__dataclass_fields__)
        if not isinstance(d, dict) or set(d) != names:
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
        parts = d["parts"]
        if not isinstance(parts, list) or not all(_part(p) for p in parts):
            raise ValueError("parts must be a list of {key, size, root}")
        if not _uint(d["bytes"], 64) or d["bytes"] != sum(p["size"] for p in parts):
            raise ValueError(f"bytes {d['bytes']!r:.40} is not the sum of the parts' sizes")
        return cls(**{**d, "start_lsn": start, "end_lsn": end})


def _uint(value: Any, bits: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << bits


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _part(p: Any) -> bool:
    """Is ``p`` a part as ``take_backup`` lists it (``stored`` is informative)?"""
    return (
        isinstance(p, dict)
        and isinstance(p.get("key"), str)
        and _uint(p.get("size"), 64)
        and _uint(p.get("stored", 0), 64)
        and isinstance(p.get("root"), str)
        and re.fullmatch("[0-9a-f]{32}", p["root"]) is not None
    )


async def _seal_put(
    store: ObjectStore, keys: KeyProvider, key: str, stream: str, seq: int, data: bytes, **h: Any
) -> tuple[bytes, bytes]:
    """Seal one object (records=[data]) and publish it once; returns (blob, Merkle root)."""
    data_key = await keys.data_key()
    now = time.time()
    blob = await asyncio.to_thread(
        seal,
        [data],
        stream=stream,
        epoch=h.get("epoch", 1),
        seq=seq,
        start=h.get("start", "0"),
        end=h.get("end", str(len(data))),
        first_source_time=h.get("source_time", now),
        last_source_time=h.get("source_time", now),
        data_key=data_key,
        created_at=now,
    )
    await store.put(key, blob, if_absent=True)
    return blob, merkle_root([leaf_hash(data)])


async def take_backup(
    options: PostgresOptions,
    stream: str,
    store: ObjectStore,
    keys: KeyProvider,
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> BackupManifest:
    """Run ``pg_basebackup`` against the primary and store it in the vault.

    Raises ``SourceError`` if ``pg_basebackup`` fails (nothing partial is ever
    used: the manifest is written only after every part). Not idempotent by
    design: each call makes a new backup with a new id.
    """
    started = time.time()
    backup_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    prefix = backup_prefix(stream, backup_id)
    conninfo, env = pgtools.conninfo_and_env(options.dsn.reveal())
    argv = ["-d", conninfo, "-D", "-", "-Ft", "-X", "fetch", "-c", "fast", "-v"]
    proc = await asyncio.create_subprocess_exec(
        *pgtools.command(options, "pg_basebackup", *argv),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd="/",
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    parts: list[dict[str, Any]] = []
    total = 0
    try:
        async with asyncio.TaskGroup() as tg:
            err_task = tg.create_task(proc.stderr.read())
            async for chunk in _chunks(proc.stdout, int(options.backup_part_bytes)):
                seq = len(parts) + 1
                key = f"{prefix}part-{seq:08d}.seg"
                name = sealed_name(stream, backup_id)
                blob, root = await _seal_put(
                    store, keys, key, name, seq, chunk, start=str(total),
                    end=str(total + len(chunk)),
                )  # fmt: skip
                parts.append(
                    {"key": key, "size": len(chunk), "stored": len(blob), "root": root.hex()}
                )
                total += len(chunk)
                if on_bytes:
                    on_bytes(len(chunk))
        await proc.wait()
    except BaseException:
        if proc.returncode is None:  # a failed upload: stop pg_basebackup, never block on it
            proc.kill()
            await proc.wait()
        raise
    err = err_task.result().decode(errors="replace")
    if proc.returncode:
        raise SourceError(f"pg_basebackup failed (exit {proc.returncode}): {err.strip()[-800:]}")
    start, end = _START.search(err), _END.search(err)
    if not start or not end:
        raise SourceError(f"pg_basebackup did not report its WAL range: {err.strip()[-400:]}")
    manifest = BackupManifest(
        id=backup_id,
        stream=stream,
        timeline=int(start.group(2)),
        start_lsn=L.parse_lsn(start.group(1)),
        end_lsn=L.parse_lsn(end.group(1)),
        start_time=started,
        end_time=time.time(),
        parts=parts,
        bytes=total,
    )
    await _seal_put(
        store,
        keys,
        prefix + "manifest.seg",
        sealed_name(stream, backup_id),
        0,
        manifest.to_json(),
        source_time=manifest.end_time,
    )
    return manifest


async def _chunks(reader: asyncio.StreamReader, size: int) -> AsyncIterator[bytes]:
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
    user), then check it with ``pg_verifybackup``. Parts are fetched ``_PREFETCH`` ahead
    and written in order. Raises ``IntegrityError`` on a part that fails verification,
    ``SourceError`` if tar or pg_verifybackup fail."""
    pgtools.give_to_owner(options, data_dir)
    tar = await asyncio.create_subprocess_exec(
        *pgtools.owner_command(options, "tar", "-x", "-f", "-", "-C", str(data_dir)),
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert tar.stdin is not None and tar.stderr is not None
    try:
        async with asyncio.TaskGroup() as tg:
            pending: deque[asyncio.Task[bytes]] = deque()
            seqs = iter(range(1, len(manifest.parts) + 1))
            for seq in itertools.islice(seqs, _PREFETCH):
                pending.append(tg.create_task(_fetch_part(store, keys, manifest, seq)))
            while pending:
                data = await pending.popleft()  # in order; only _PREFETCH parts in memory
                if (seq := next(seqs, None)) is not None:
                    pending.append(tg.create_task(_fetch_part(store, keys, manifest, seq)))
                tar.stdin.write(data)
                await tar.stdin.drain()
                if on_bytes:
                    on_bytes(len(data))
        tar.stdin.close()
        err = await tar.stderr.read()
        if await tar.wait():
            raise SourceError(f"tar failed extracting backup {manifest.id}: {err.decode()[-400:]}")
    finally:
        if tar.returncode is None:
            tar.kill()
            await tar.wait()
    await pgtools.run(options, "pg_verifybackup", str(data_dir))


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
