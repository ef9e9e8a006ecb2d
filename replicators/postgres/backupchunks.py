"""Base backups as chunks in packs (manifest version 2): writing and reading them back.

``pg_basebackup``'s tar stream is cut with FastCDC (``replicators/chunking.py``)
at min 16 KiB / avg 64 KiB / max 256 KiB. Why those sizes: PostgreSQL changes a
data file a page (8 KiB) at a time and the tar puts files whole, one after the
other, so a change touches few pages in few places; 16 KiB is two pages (no
chunk smaller than that, so the manifest does not grow with tiny chunks),
64 KiB on average keeps the bytes shipped again per changed page low (a changed
page costs its chunk, about eight pages) while a manifest entry (about 90
bytes) stays under 0.2 % of the data it describes, and 256 KiB caps what a
change costs where FastCDC finds no cut (long runs of one byte, e.g. zeroed
pages, are cut at the maximum and all give the same chunk). A chunk's id is the
SHA-256 of its bytes; it only ever appears inside sealed (encrypted) objects.

New chunks go into packs of about ``backup_part_bytes``; each pack is one sealed
segment (one record, the chunks' bytes one after the other) stored under the
backup's own prefix::

    backups/<stream>/<id>/pack-<n:08d>.seg   n = 1, 2, ...; sealed stream
                                             "<stream>:backup:<id>", seq n

The manifest lists the tar stream as its ordered chunks, each as (pack, offset,
length, id) where pack indexes the manifest's ``packs`` (key, size, sealed
size, Merkle root), a pack possibly in an earlier backup's prefix.

Dedupe rule (the garbage collector relies on it): a new backup reuses chunks of
**only the newest complete backup** of its stream (the newest manifest when the
backup starts, read with ``list_backups``), plus chunks repeated within itself.
Retention always keeps the newest complete backup, with every key
``backup_keys`` names for it, and never collects a backup in progress (a prefix
without a manifest); so every pack a backup references while it is being taken
is kept: its own packs are in a prefix without a manifest, the others are named
by the newest complete backup, which stays the newest until this backup's
manifest is written. That assumes one backup of a stream at a time (the
schedule and the CLI take one at a time): two concurrent ones could each be
the newest in turn and drop what the other started from. A consequence for the
collector: an older backup's prefix may hold packs a newer backup uses, so it
deletes keys no retained backup names (``backup_keys``), never whole prefixes.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple

from replicators.chunking import Chunker, Piece, chunk_id
from replicators.errors import IntegrityError, NotFound, SourceError
from replicators.keys import KeyProvider, unseal
from replicators.segment import seal
from replicators.store import ObjectStore
from verifiers.merkle import leaf_hash, merkle_root

CHUNKER = Chunker(16 << 10, 64 << 10, 256 << 10)
PREFETCH = 4  # packs fetched ahead of the one being written out
_CACHED = PREFETCH + 2  # packs held at most (fetched ahead, or kept for reuse)
_LOOKAHEAD_RUNS = 64  # how far ahead (in runs of one pack) fetching looks
_PACK_KEY = re.compile(r"backups/([^/]+)/([0-9]{8}T[0-9]{6}Z)/pack-([0-9]{8})\.seg")


def backup_prefix(stream: str, backup_id: str | None = None) -> str:
    return f"backups/{stream}/" + (f"{backup_id}/" if backup_id else "")


def sealed_name(stream: str, backup_id: str) -> str:
    """The stream name sealed into a backup's objects: binds every part to its backup."""
    return f"{stream}:backup:{backup_id}"


def pack_key(stream: str, backup_id: str, n: int) -> str:
    return f"{backup_prefix(stream, backup_id)}pack-{n:08d}.seg"


def parse_pack_key(key: str) -> tuple[str, str, int]:
    """(stream, backup id, pack number) of a pack key; ``ValueError`` if it is not one."""
    match = _PACK_KEY.fullmatch(key)
    if not match or int(match.group(3)) == 0:
        raise ValueError(f"not a pack key: {key!r:.120}")
    return match.group(1), match.group(2), int(match.group(3))


class ChunkRef(NamedTuple):
    """One chunk of the tar stream: ``length`` bytes at ``offset`` in pack number ``pack``
    of the manifest's ``packs``, whose SHA-256 is ``id`` (hex)."""

    pack: int
    offset: int
    length: int
    id: str


async def seal_put(
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


class Packer:
    """Gathers one backup's chunks: a chunk already in ``base`` (the newest complete
    backup's packs and chunks, or nothing) or earlier in this backup is referenced,
    a new one is added to the open pack, sealed and stored once it holds
    ``pack_bytes``. ``packs`` and ``chunks`` are the manifest's, once ``close``d."""

    def __init__(
        self,
        store: ObjectStore,
        keys: KeyProvider,
        stream: str,
        backup_id: str,
        pack_bytes: int,
        base: tuple[Sequence[dict[str, Any]], Sequence[ChunkRef]] | None,
    ) -> None:
        self._store, self._keys, self._stream, self._id = store, keys, stream, backup_id
        self._pack_bytes = max(1, pack_bytes)
        self.packs: list[dict[str, Any]] = []
        self.chunks: list[ChunkRef] = []
        self.stored = 0  # sealed bytes of this backup's own packs
        self._base_packs: Sequence[dict[str, Any]] = base[0] if base else ()
        self._base_index: dict[str, ChunkRef] = {c.id: c for c in base[1]} if base else {}
        self._from_base: dict[int, int] = {}  # base pack index -> index in self.packs
        self._index: dict[str, ChunkRef] = {}  # chunks of this backup by id
        self._open: list[bytes] = []
        self._open_size = 0
        self._open_index = -1
        self._numbered = 0

    async def add(self, piece: Piece) -> None:
        hex_id = piece.id.hex()
        ref = self._index.get(hex_id)
        if ref is None and (old := self._base_index.get(hex_id)) is not None:
            pack = self._from_base.get(old.pack)
            if pack is None:
                pack = self._from_base[old.pack] = len(self.packs)
                self.packs.append(dict(self._base_packs[old.pack]))
            ref = self._index[hex_id] = old._replace(pack=pack)
        if ref is None:
            if self._open_index < 0:
                self._numbered += 1
                self._open_index = len(self.packs)
                self.packs.append({"key": pack_key(self._stream, self._id, self._numbered)})
            ref = ChunkRef(self._open_index, self._open_size, piece.length, hex_id)
            self._index[hex_id] = ref
            self._open.append(piece.data)
            self._open_size += piece.length
            if self._open_size >= self._pack_bytes:
                await self._seal()
        self.chunks.append(ref)

    async def close(self) -> None:
        if self._open_index >= 0:
            await self._seal()

    async def check_reused(self) -> None:
        """Raise ``SourceError`` if a pack of an earlier backup this one uses is gone.

        Called before the manifest is written: the dedupe rule keeps them (above),
        this catches a collector or a second concurrent backup that broke it, so a
        backup that could not be restored is never published."""
        own = backup_prefix(self._stream, self._id)
        gate = asyncio.Semaphore(16)

        async def present(key: str) -> None:
            async with gate:
                try:
                    await self._store.stat(key)
                except NotFound:
                    raise SourceError(
                        f"pack {key}, which this backup reuses, left the vault while the "
                        "backup was taken (was the previous backup collected?)"
                    ) from None

        await asyncio.gather(
            *(present(p["key"]) for p in self.packs if not p["key"].startswith(own))
        )

    async def _seal(self) -> None:
        entry = self.packs[self._open_index]
        data = b"".join(self._open)
        blob, root = await seal_put(
            self._store, self._keys, entry["key"], sealed_name(self._stream, self._id),
            self._numbered, data,
        )  # fmt: skip
        entry.update(size=len(data), stored=len(blob), root=root.hex())
        self.stored += len(blob)
        self._open, self._open_size, self._open_index = [], 0, -1


async def fetch_pack(
    store: ObjectStore, keys: KeyProvider, stream: str, pack: dict[str, Any]
) -> bytes:
    """A pack's plaintext, verified: sealed under its own backup's name and number, one
    record of the manifest's size and Merkle root. Raises ``IntegrityError``."""
    try:
        owner, backup_id, n = parse_pack_key(pack["key"])
    except ValueError as exc:
        raise IntegrityError(str(exc), where="backup manifest") from None
    if owner != stream:
        raise IntegrityError(f"pack {pack['key']} belongs to another stream")
    blob = await store.get(pack["key"])
    opened = await unseal(blob, keys, expect_stream=sealed_name(stream, backup_id), expect_seq=n)
    if (
        len(opened.records) != 1
        or len(opened.records[0]) != pack["size"]
        or opened.root.hex() != pack["root"]
    ):
        raise IntegrityError(f"backup pack {pack['key']}: differs from the backup's manifest")
    return opened.records[0]


def _runs(chunks: Sequence[ChunkRef]) -> list[tuple[int, int, int]]:
    """(pack, first, end) for each run of consecutive chunks in one pack."""
    runs: list[tuple[int, int, int]] = []
    for i, c in enumerate(chunks):
        if runs and runs[-1][0] == c.pack:
            runs[-1] = (c.pack, runs[-1][1], i + 1)
        else:
            runs.append((c.pack, i, i + 1))
    return runs


def _checked_run(data: bytes, chunks: Sequence[ChunkRef], key: str) -> list[memoryview]:
    view = memoryview(data)
    out = []
    for c in chunks:
        piece = view[c.offset : c.offset + c.length]
        if len(piece) != c.length or chunk_id(piece).hex() != c.id:
            raise IntegrityError(f"backup pack {key}: chunk at {c.offset} is not {c.id}")
        out.append(piece)
    return out


async def chunk_blocks(
    store: ObjectStore,
    keys: KeyProvider,
    stream: str,
    packs: Sequence[dict[str, Any]],
    chunks: Sequence[ChunkRef],
) -> AsyncIterator[list[memoryview]]:
    """The tar stream back, in order, as the verified chunks of each run of one pack.

    Packs are fetched ahead (the next ``PREFETCH`` distinct packs the chunk list
    names) and at most ``_CACHED`` are held, least recently used dropped first, so
    memory is bounded by a few packs whatever the order. Raises ``IntegrityError``
    on a pack or chunk that fails verification. Close it (``aclosing``) to stop
    the fetches it started.
    """
    runs = _runs(chunks)
    cache: dict[int, asyncio.Task[bytes]] = {}
    try:
        for i, (pack, first, end) in enumerate(runs):
            window: list[int] = []
            for ahead, _, _ in runs[i : i + _LOOKAHEAD_RUNS]:
                if ahead not in window:
                    window.append(ahead)
                    if len(window) > PREFETCH:
                        break
            for p in window:
                if p not in cache:
                    cache[p] = asyncio.create_task(fetch_pack(store, keys, stream, packs[p]))
            for p in [p for p in cache if p not in window][: max(0, len(cache) - _CACHED)]:
                cache.pop(p).cancel()
            cache[pack] = cache.pop(pack)  # most recently used last
            data = await cache[pack]
            yield await asyncio.to_thread(_checked_run, data, chunks[first:end], packs[pack]["key"])
    finally:
        for task in cache.values():
            task.cancel()
        await asyncio.gather(*cache.values(), return_exceptions=True)
