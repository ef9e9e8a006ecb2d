"""The active side: ship the chunks of complete versions the destination lacks, then manifests.

For each complete version not yet shipped in the model store (``modelstore``:
a directory tree or an S3 prefix), every file is cut into
chunks (``chunker``); a chunk the destination already holds (``index``) is
only referenced, any other is packed into a new pack (``packs``) that is
sealed for the destination and published in its vault. When every pack of
the version is durable, ``next_batch`` returns one change: the manifest.
The shipper seals it into the stream's next segment, so a version becomes
visible at the destination only after all its chunks are there (chunks
first, manifest last).

Positions count manifest records: record ``i`` covers ``[i, i + 1)``.
After a crash, ``resume`` asks the vault about packs whose upload was in
flight (present: kept; absent: forgotten), so completed packs are never sent
again, and the version is re-chunked locally with only missing chunks
uploaded.

RPO: ``pending_since()`` is the newest-file time of the oldest due version
not yet handed out (versions left for a later batch included), and
``head()`` is (next position, the time a scan that found nothing due began).
A scan that fails, or that lists nothing while versions were shipped (an
unmounted volume looks empty), proves nothing.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, ParamSpec, TypeVar

from replicators import logs
from replicators.artifacts import layout, open_model_store
from replicators.artifacts.chunker import Chunker, Piece
from replicators.artifacts.index import SourceIndex
from replicators.artifacts.manifest import (
    ChunkRef,
    FileEntry,
    Manifest,
    Tombstone,
    encode,
    encode_tombstone,
)
from replicators.artifacts.modelstore import Changed, ModelStore
from replicators.artifacts.options import ArtifactsOptions
from replicators.artifacts.packs import PackRef, seal_pack
from replicators.artifacts.restore import catalogue
from replicators.errors import NotFound, SourceError
from replicators.keys import KeyProvider
from replicators.store import ObjectStore
from replicators.stream import Change
from replicators.vault import Vault

P = ParamSpec("P")
T = TypeVar("T")
KIND = "artifacts"
DELETED = "deleted"  # the fingerprint recorded for a tombstone
_STEP_BYTES = 32 << 20  # bytes chunked per worker-thread step


@dataclass
class _OpenPack:
    ref: PackRef
    chunks: list[bytes] = field(default_factory=list)
    ids: list[tuple[bytes, int]] = field(default_factory=list)
    size: int = 0


class _Packer:
    """Collects new chunks into packs and publishes each full pack in the background.

    ``place(id, data)`` returns the chunk's (pack key, record); chunks already
    placed in this run are placed once. ``finish()`` publishes the last pack
    and waits for every upload. Uploads run in ``tg`` (bounded by ``slots``).
    """

    def __init__(self, src: ArtifactsSource, tg: asyncio.TaskGroup) -> None:
        self.src, self.tg = src, tg
        self.slots = asyncio.Semaphore(src.options.uploads)
        self.placed: dict[bytes, tuple[str, int]] = {}
        self.current: _OpenPack | None = None
        self.bytes_sent = 0

    async def place(self, piece: Piece) -> tuple[str, int]:
        known = self.placed.get(piece.id) or self.src.index.lookup(piece.id)
        if known is not None:
            return known
        limit = self.src.options.pack_size
        if self.current is not None and self.current.size + piece.length > limit:
            await self._publish()  # a pack never exceeds pack_size (one PUT, no multipart)
        if self.current is None:
            seq = self.src.index.next_pack_seq()
            self.current = _OpenPack(PackRef(self.src.stream, self.src.index.writer, seq))
        pack = self.current
        where = (pack.ref.key, len(pack.chunks))
        pack.chunks.append(piece.data)
        pack.ids.append((piece.id, piece.length))
        pack.size += piece.length
        self.placed[piece.id] = where
        return where

    async def _publish(self) -> None:
        pack, self.current = self.current, None
        if pack is None:
            return
        await self.slots.acquire()  # backpressure: at most `uploads` packs held in memory
        self.src.index.begin_pack(pack.ref.key, pack.ids)
        self.tg.create_task(self._upload(pack))

    async def _upload(self, pack: _OpenPack) -> None:
        try:
            key = await self.src.keys.data_key()
            blob = await self.src.in_worker(seal_pack, pack.ref, pack.chunks, key)
            pack.chunks = []
            await Vault(self.src.store).put_blob(pack.ref.key, blob)
            self.src.index.pack_done(pack.ref.key, len(blob))
            self.bytes_sent += len(blob)
        finally:
            self.slots.release()

    async def finish(self) -> None:
        await self._publish()


class ArtifactsSource:
    """A ``Source`` over one model store, for one destination vault (its store and keys)."""

    KIND: ClassVar[str] = KIND

    def __init__(
        self,
        stream: str,
        options: ArtifactsOptions,
        store: ObjectStore,
        keys: KeyProvider,
        state_dir: Path,
    ) -> None:
        self.stream = stream
        self.options = options
        self.store = store
        self.keys = keys
        self.index = SourceIndex(state_dir / "source.db")
        # Cutting, hashing and sealing run on two threads of their own: the two stages
        # overlap, and the big buffers come from two malloc arenas rather than one per
        # thread of the default executor (RSS, docs/artifacts.md "Shipping").
        self._workers = ThreadPoolExecutor(2, thread_name_prefix=f"artifacts-{stream}")
        self.models: ModelStore | None = None
        """The model store read; opened by ``resume`` unless given."""
        self.chunker = Chunker(
            int(options.chunk_min), int(options.chunk_avg), int(options.chunk_max)
        )
        self.log = logs.get("artifacts", stream=stream)
        self._next = 0
        self._acked = 0
        self._shipping = False
        self._pending_since: float | None = None
        self._head: tuple[int, float] | None = None
        self._vault_roots: dict[tuple[str, str], str] = {}
        self._gone: list[tuple[str, str]] = []
        self.bytes_sent = 0
        """Pack bytes published by this process (tests and benchmarks read it)."""

    def pending_since(self) -> float | None:
        return self._pending_since

    def head(self) -> tuple[int, float] | None:
        """(position, at): every version complete at ``at`` lies before ``position`` (see the
        module docstring; ``replicators.progress.Head``); None until a scan proves it."""
        return self._head

    async def resume(self, position: int) -> None:
        """Settle in-flight uploads, then drop manifest records that are not durable."""
        if self.models is None:
            self.models = await open_model_store(self.options)
        for key in self.index.uploading():
            try:
                info = await self.store.stat(key)
            except NotFound:
                self.index.forget_pack(key)
            else:
                self.index.pack_done(key, info.size)
        self.index.resume(position)
        self._head = None
        if position > 0 and self.index.empty():
            await self._rebuild()
        self._next = position

    async def _rebuild(self) -> None:
        """A lost (or new) index for a destination that already holds versions: learn its
        chunks from the manifests in its vault, so none of them is sent again."""
        known = await catalogue(Vault(self.store), self.keys, self.stream)
        packs: dict[str, dict[bytes, tuple[int, int]]] = {}
        for m in known.values():
            for f in m.files:
                for c in f.chunks:
                    packs.setdefault(m.packs[c.pack], {})[c.id] = (c.record, c.length)
        for key, chunks in packs.items():
            self.index.adopt(key, 0, [(cid, rec, n) for cid, (rec, n) in chunks.items()])
        self._vault_roots = {k: m.root().hex() for k, m in known.items()}
        self.log.info(
            "chunk index rebuilt from the destination", versions=len(known), packs=len(packs)
        )

    async def ack(self, position: int) -> None:
        """Records before ``position`` are durable: once all are and no version is being
        shipped, garbage collection may run again."""
        self._acked = position
        if position >= self._next and not self._shipping:
            self.index.end_upload()

    async def in_worker(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args)`` on one of the source's worker threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._workers, functools.partial(fn, *args, **kwargs))

    async def aclose(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)
        self.index.close()
        if self.models is not None:
            await self.models.aclose()

    @property
    def _store(self) -> ModelStore:
        if self.models is None:
            raise RuntimeError("the artifacts source is used before resume()")
        return self.models

    # -- finding work -------------------------------------------------------------------------

    async def _due(self) -> tuple[list[layout.VersionInfo], float | None]:
        """Complete versions not shipped (or changed since), and when the next one may become
        complete. A scan that finds none (and lists something, or nothing was shipped) is the
        head: every version complete when it began lies before the next position."""
        began = time.time()
        versions = await self._store.scan()
        shipped = self.index.shipped()
        now, due, wake = time.time(), [], None
        marker, quiet = self.options.marker, self.options.quiet_period
        for v in versions:
            prior = shipped.get(v.key)
            if prior is not None and prior[0] == v.fingerprint():
                continue
            if layout.complete(v, now, marker, quiet):
                due.append(v)
            else:
                at = layout.ready_at(v, marker, quiet)
                if at is not None:
                    wake = at if wake is None else min(wake, at)
        self._gone = self._deleted(versions, shipped)
        self._pending_since = min((v.newest for v in due), default=None)
        trusted = bool(versions) or all(fp == DELETED for fp, _ in shipped.values())
        if not due and not self._gone and trusted:
            self._head = (self._next, began)
        return due, wake

    def _deleted(
        self, versions: list[layout.VersionInfo], shipped: dict[tuple[str, str], tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """Shipped versions whose directory is gone. An empty or missing store deletes nothing
        (an unmounted volume must not empty every destination)."""
        if not self.options.mirror_deletes or not versions:
            return []
        present = {v.key for v in versions}
        return sorted(k for k, (fp, _) in shipped.items() if fp != DELETED and k not in present)

    def _tombstones(self) -> list[Change]:
        out = []
        for model, version in self._gone:
            now = time.time()
            payload = encode_tombstone(Tombstone(model, version, now))
            self.index.add_record(self._next, model, version, DELETED, "")
            out.append(Change(payload, self._next, self._next + 1, now))
            self._next += 1
            self.log.info("version deleted at the source", version=f"{model}/{version}")
        self._gone = []
        return out

    async def next_batch(self, max_bytes: int, max_age: float, stop: asyncio.Event) -> list[Change]:
        """Ship the chunks of complete versions; return their manifests (at most ``max_bytes``
        of manifests, or one). Waits for a version (watch, scan) until ``stop``."""
        while not stop.is_set():
            due, wake = await self._due()
            if self._gone:
                return self._tombstones()
            if due:
                self.index.begin_upload()
                batch: list[Change] = []
                left = list(due)  # not handed out yet: still pending after this batch
                size = 0
                for v in due:
                    if stop.is_set() or (batch and size >= max_bytes):
                        break
                    self._shipping = True
                    try:
                        change = await self._ship(v, stop)
                    finally:
                        self._shipping = False
                    if change is not None:
                        batch.append(change)
                        size += len(change.payload)
                        left.remove(v)
                self._pending_since = min((v.newest for v in left), default=None)
                if batch or stop.is_set():
                    return batch
                continue
            if self._acked >= self._next and self.index.upload_in_progress():
                self.index.end_upload()  # idle, and everything handed out is durable
            delay = self.options.scan_interval
            if wake is not None:
                delay = min(delay, max(0.0, wake - time.time()) + 0.01)
            await self._store.wait(delay, stop)
        return []

    # -- shipping one version -------------------------------------------------------------------

    async def _ship(self, v: layout.VersionInfo, stop: asyncio.Event) -> Change | None:
        """Publish every chunk of ``v`` the destination lacks; return its manifest change, or
        None if the version changed while it was read (it is tried again later) or on stop."""
        started = time.monotonic()
        files: list[tuple[layout.FileInfo, list[tuple[bytes, int, str, int]]]] = []
        changed = False
        async with asyncio.TaskGroup() as tg:
            packer = _Packer(self, tg)
            for f in v.files:
                if stop.is_set():
                    break
                try:
                    files.append((f, await self._chunk_file(v, f, packer)))
                except Changed:
                    changed = True
                    break
            await packer.finish()
        self.bytes_sent += packer.bytes_sent
        if stop.is_set() or changed:
            return None
        again = await self._store.scan_version(v.model, v.version)
        if again is None or again.fingerprint() != v.fingerprint():
            return None
        manifest = _manifest(v, files, self.chunker.params)
        root = manifest.root().hex()
        if self._vault_roots.get(v.key) == root:  # already there (rebuilt index): no record
            self.index.add_adopted(v.model, v.version, v.fingerprint(), root)
            del self._vault_roots[v.key]
            return None
        payload = encode(manifest)
        position = self._next
        self.index.add_record(position, v.model, v.version, v.fingerprint(), root)
        self._next += 1
        self.log.info(
            "version shipped",
            version=v.name,
            bytes=v.size,
            sent=packer.bytes_sent,
            seconds=round(time.monotonic() - started, 3),
        )
        return Change(payload, position, position + 1, v.newest)

    async def _chunk_file(
        self, v: layout.VersionInfo, f: layout.FileInfo, packer: _Packer
    ) -> list[tuple[bytes, int, str, int]]:
        """Cut one file (reading and hashing in a worker thread); place its chunks. Returns
        ``[(id, length, pack key, record)]`` in file order. Raises ``Changed`` when the file
        is not the size it was listed with (or the store says it changed)."""
        out: list[tuple[bytes, int, str, int]] = []
        where = f"{self._store.name}: {v.name}/{f.path}"
        size = 0
        try:
            reader = await self.in_worker(self._store.reader, v, f)
            try:
                pieces = self.chunker.cut_stream(reader)
                while step := await self.in_worker(_take, pieces, _STEP_BYTES):
                    for piece in step:
                        key, record = await packer.place(piece)
                        out.append((piece.id, piece.length, key, record))
                        size += piece.length
            finally:
                reader.close()
        except FileNotFoundError:
            raise Changed(where) from None
        except OSError as exc:
            raise SourceError(f"cannot read {where}: {exc.strerror or exc}") from None
        if size != f.size:
            raise Changed(where)
        return out


def _take(pieces: Iterator[Piece], limit: int) -> list[Piece]:
    out, size = [], 0
    for piece in pieces:
        out.append(piece)
        size += piece.length
        if size >= limit:
            break
    return out


def _manifest(
    v: layout.VersionInfo,
    files: list[tuple[layout.FileInfo, list[tuple[bytes, int, str, int]]]],
    chunking: str,
) -> Manifest:
    packs: dict[str, int] = {}
    entries = []
    for f, chunks in files:
        refs = tuple(
            ChunkRef(cid, length, packs.setdefault(key, len(packs)), record)
            for cid, length, key, record in chunks
        )
        entries.append(FileEntry(f.path, sum(c.length for c in refs), f.mode, refs))
    return Manifest(
        model=v.model,
        version=v.version,
        files=tuple(entries),
        packs=tuple(packs),
        chunking=chunking,
        created_at=time.time(),
        source_time=v.newest,
    )
