"""Rebuild a version's files from its manifest and the packs in a vault.

Every pack the manifest names is fetched once and verified in full (its
authentication tags and Merkle root, ``packs.open_pack``); every chunk taken
from it is checked against its id (SHA-256) and length before it is written
at its offset, opening one file at a time (a version may hold more files
than the process may open). Files are fsynced, given their permission bits
(``mode & 0o777``: never setuid, setgid or sticky), and the directory is
fsynced. Any failure raises ``ArtifactIntegrityError`` naming the artifact,
the file, the chunk and the pack, and leaves nothing published (callers
assemble into a hidden directory and rename it into place).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from replicators.artifacts.chunker import chunk_id
from replicators.artifacts.manifest import ChunkRef, FileEntry, Manifest, locate
from replicators.artifacts.packs import PackRef, damaged_records, open_pack
from replicators.errors import IntegrityError, NotFound
from replicators.keys import KeyProvider
from replicators.store import ObjectStore

PARALLEL_PACKS = 4

Occurrence = tuple[FileEntry, int, int, ChunkRef]


class ArtifactIntegrityError(IntegrityError):
    """A chunk of an artifact cannot be trusted: names artifact, file, chunk and pack."""


class MissingPack(ArtifactIntegrityError):
    """A pack the manifest names is not in the vault (collected, or never there)."""


def describe(m: Manifest, occ: Occurrence) -> str:
    f, index, offset, ref = occ
    return (
        f"artifact {m.name}: file {f.path} chunk {index} "
        f"(offset {offset}, {ref.length} bytes, id {ref.id.hex()[:16]}…)"
    )


def pack_error(
    m: Manifest, key: str, occs: list[Occurrence], exc: Exception
) -> ArtifactIntegrityError:
    """The error for a pack that failed verification, naming the chunks it damages."""
    hit = occs
    if isinstance(exc, IntegrityError):
        lengths = {ref.record: ref.length for _, _, _, ref in occs}
        records = damaged_records(exc, lengths)
        if records:
            hit = [o for o in occs if o[3].record in records] or occs
    more = f" and {len(hit) - 1} more chunks" if len(hit) > 1 else ""
    kind = MissingPack if isinstance(exc, NotFound) else ArtifactIntegrityError
    return kind(
        f"{describe(m, hit[0])}{more}: pack {key} failed verification: {exc}",
        hint="scrub the stream (`dragent verify <stream> --deep`) and restore from another vault",
    )


async def fetch_pack(
    store: ObjectStore, keys: KeyProvider, m: Manifest, key: str, occs: list[Occurrence]
) -> list[bytes]:
    """Fetch and verify one pack; return its records. Raises ``ArtifactIntegrityError``."""
    try:
        ref = PackRef.parse(key)
        blob = await store.get(key)
        return (await open_pack(ref, blob, keys)).records
    except NotFound as exc:
        raise pack_error(m, key, occs, exc) from None
    except IntegrityError as exc:
        raise pack_error(m, key, occs, exc) from None


def check_chunk(m: Manifest, occ: Occurrence, records: list[bytes], key: str) -> bytes:
    """The chunk's bytes, once its length and id are right."""
    ref = occ[3]
    if ref.record >= len(records):
        why = f"pack {key} has {len(records)} records, chunk is record {ref.record}"
        raise ArtifactIntegrityError(f"{describe(m, occ)}: {why}")
    data = records[ref.record]
    if len(data) != ref.length or chunk_id(data) != ref.id:
        raise ArtifactIntegrityError(
            f"{describe(m, occ)}: record {ref.record} of pack {key} does not hash to the chunk id"
        )
    return data


def _prepare(directory: Path, m: Manifest) -> None:
    """Create every file at its size, empty; none is kept open (a version may hold more
    files than this process may open at once)."""
    directory.mkdir(parents=True, exist_ok=False)
    for f in m.files:
        path = directory / f.path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, f.size)
        finally:
            os.close(fd)


def _write(directory: Path, pieces: list[tuple[str, int, bytes]]) -> None:
    """Write each piece at its offset, opening one file at a time."""
    by_file: dict[str, list[tuple[int, bytes]]] = {}
    for path, offset, data in pieces:
        by_file.setdefault(path, []).append((offset, data))
    for path, writes in by_file.items():
        fd = os.open(directory / path, os.O_WRONLY)
        try:
            for offset, data in writes:
                view = memoryview(data)
                while view:
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n
        finally:
            os.close(fd)


def _finish(directory: Path, m: Manifest) -> None:
    """Give every file its mode (permission bits only: never setuid, setgid or sticky
    from another region) and fsync it, one at a time; then fsync the directories."""
    for f in m.files:
        fd = os.open(directory / f.path, os.O_RDONLY)
        try:
            os.fchmod(fd, f.mode & 0o777)
            os.fsync(fd)
        finally:
            os.close(fd)
    dirs = {directory} | {(directory / f.path).parent for f in m.files}
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LocalChunks = dict[bytes, tuple[Path, int, int]]
"""Chunks already on local disk: ``{id: (file, offset, length)}`` (earlier versions)."""


def _copy_local(directory: Path, occs: list[Occurrence], local: LocalChunks) -> list[Occurrence]:
    """Write the chunks found intact on local disk; return the occurrences still missing.
    A local chunk is used only if its bytes hash to its id (files may have changed)."""
    missing = []
    for occ in occs:
        f, _, offset, ref = occ
        where = local.get(ref.id)
        data = b""
        if where is not None and where[2] == ref.length:
            try:
                with open(where[0], "rb") as src:
                    src.seek(where[1])
                    data = src.read(ref.length)
            except OSError:
                data = b""
        if len(data) == ref.length and chunk_id(data) == ref.id:
            _write(directory, [(f.path, offset, data)])
        else:
            missing.append(occ)
    return missing


async def assemble(
    m: Manifest,
    store: ObjectStore,
    keys: KeyProvider,
    directory: Path,
    progress: Callable[[int], None] | None = None,
    local: LocalChunks | None = None,
) -> int:
    """Write every file of ``m`` under ``directory`` (created; must not exist).

    Chunks in ``local`` (verified by their hash) are copied from local disk;
    the others come from the packs, each pack fetched at most once.
    ``progress(n)`` is called with the bytes written after each pack. Returns
    the bytes taken from packs. Raises ``ArtifactIntegrityError`` (a bad,
    missing or mismatching pack or chunk), ``KeyAccessError``, ``Unavailable``
    or ``OSError``; on any error the directory may hold partial files and is
    the caller's to remove.
    """
    await asyncio.to_thread(_prepare, directory, m)
    slots = asyncio.Semaphore(PARALLEL_PACKS)
    fetched = 0

    async def one(key: str, occs: list[Occurrence]) -> None:
        nonlocal fetched
        async with slots:
            total = sum(o[3].length for o in occs)
            if local:
                occs = await asyncio.to_thread(_copy_local, directory, occs, local)
            if occs:
                records = await fetch_pack(store, keys, m, key, occs)
                pieces = [(o[0].path, o[2], check_chunk(m, o, records, key)) for o in occs]
                del records
                await asyncio.to_thread(_write, directory, pieces)
                fetched += sum(len(p[2]) for p in pieces)
        if progress is not None:
            progress(total)

    try:
        async with asyncio.TaskGroup() as tg:
            for key, occs in locate(m).items():
                tg.create_task(one(key, occs))
        await asyncio.to_thread(_finish, directory, m)
    except BaseExceptionGroup as group:
        raise _first(group) from None
    return fetched


def _first(group: BaseExceptionGroup) -> BaseException:
    """The most telling error of a task group: an integrity error first."""
    flat: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> None:
        for e in g.exceptions:
            walk(e) if isinstance(e, BaseExceptionGroup) else flat.append(e)

    walk(group)
    for e in flat:
        if isinstance(e, IntegrityError):
            return e
    return flat[0]
