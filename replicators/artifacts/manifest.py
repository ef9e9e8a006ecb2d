"""Manifests: what one artifact version is made of (spec: docs/artifacts.md, "Manifest").

A manifest lists a version's files (relative path, size, mode) and, per file,
its chunks in order (id, length, and where the chunk is stored: a pack and a
record index in it). Its *root* depends only on content, never on where
chunks are stored, so source and destination compute the same root:

    chunk leaf  = leaf(id || u32(length))
    file root   = MTH(chunk leaves)                     (xxh3-128, RFC 9162 shape)
    file leaf   = leaf(str16(path) || u64(size) || u32(mode) || file root)
    root        = MTH(file leaves, files sorted by path)

Pure: no I/O. ``decode`` raises ``IntegrityError`` on anything malformed.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from replicators.errors import IntegrityError
from verifiers.merkle import leaf_hash, merkle_root

FORMAT = "dragent-artifact-manifest/1"
DELETE_FORMAT = "dragent-artifact-delete/1"
_U16, _U32, _U64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")
_NAME = re.compile(r"^[A-Za-z0-9._-][A-Za-z0-9._@+=-]{0,254}$")


def valid_name(name: str) -> bool:
    """A model or version name: one path component, no ``..``, no leading dot."""
    return bool(_NAME.match(name)) and not name.startswith(".") and name not in ("", "..")


def valid_path(path: str) -> bool:
    """A relative file path inside a version: components separated by ``/``, none hidden."""
    parts = path.split("/")
    return bool(parts) and all(p and p not in (".", "..") and "\0" not in p for p in parts)


@dataclass(frozen=True, slots=True)
class ChunkRef:
    id: bytes
    length: int
    pack: int
    """Index into the manifest's ``packs``."""
    record: int
    """Record index of the chunk in that pack."""


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    mode: int
    chunks: tuple[ChunkRef, ...] = ()

    def root(self) -> bytes:
        return merkle_root([leaf_hash(c.id + _U32.pack(c.length)) for c in self.chunks])

    def leaf(self) -> bytes:
        raw = self.path.encode()
        head = _U16.pack(len(raw)) + raw + _U64.pack(self.size) + _U32.pack(self.mode & 0o7777)
        return leaf_hash(head + self.root())

    def offsets(self) -> list[int]:
        """The offset of each chunk in the file."""
        out, pos = [], 0
        for c in self.chunks:
            out.append(pos)
            pos += c.length
        return out


@dataclass(frozen=True)
class Manifest:
    model: str
    version: str
    files: tuple[FileEntry, ...]
    packs: tuple[str, ...]
    """Vault keys of the packs the chunks live in (relative to the vault's prefix)."""
    chunking: str
    created_at: float
    source_time: float
    """When the version became complete at the source (feeds the RPO)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.model}/{self.version}"

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def root(self) -> bytes:
        return merkle_root([f.leaf() for f in sorted(self.files, key=lambda f: f.path)])

    def chunk_ids(self) -> set[bytes]:
        return {c.id for f in self.files for c in f.chunks}


def manifest_root(files: Iterable[FileEntry]) -> bytes:
    return merkle_root([f.leaf() for f in sorted(files, key=lambda f: f.path)])


def encode(m: Manifest) -> bytes:
    """Canonical JSON (sorted keys, no spaces); chunk ids in hex."""
    doc = {
        "format": FORMAT,
        "model": m.model,
        "version": m.version,
        "chunking": m.chunking,
        "created_at": m.created_at,
        "source_time": m.source_time,
        "root": m.root().hex(),
        "packs": list(m.packs),
        "files": [
            {
                "path": f.path,
                "size": f.size,
                "mode": f.mode,
                "chunks": [[c.id.hex(), c.length, c.pack, c.record] for c in f.chunks],
            }
            for f in m.files
        ],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _fail(why: str, where: str = "manifest") -> IntegrityError:
    return IntegrityError(why, where=where)


def _chunk(raw: Any, npacks: int, where: str) -> ChunkRef:
    if not (isinstance(raw, list) and len(raw) == 4 and isinstance(raw[0], str)):
        raise _fail("chunk entry is not [id, length, pack, record]", where)
    cid, length, pack, record = raw
    try:
        ident = bytes.fromhex(cid)
    except ValueError:
        raise _fail(f"chunk id {cid!r} is not hex", where) from None
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (length, pack, record))
    if len(ident) != 32 or not ints or length <= 0 or not 0 <= pack < npacks or record < 0:
        raise _fail(f"bad chunk entry {raw!r}", where)
    return ChunkRef(ident, length, pack, record)


def _file(raw: Any, npacks: int, name: str) -> FileEntry:
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
        raise _fail("file entry without a path", name)
    path = raw["path"]
    where = f"{name} file {path}"
    if not valid_path(path):
        raise _fail("unsafe file path", where)
    size, mode, chunks = raw.get("size"), raw.get("mode"), raw.get("chunks")
    if not isinstance(size, int) or not isinstance(mode, int) or not isinstance(chunks, list):
        raise _fail("file entry needs size, mode and chunks", where)
    refs = tuple(_chunk(c, npacks, where) for c in chunks)
    if sum(c.length for c in refs) != size:
        raise _fail(f"chunk lengths add up to {sum(c.length for c in refs)}, size is {size}", where)
    return FileEntry(path, size, mode, refs)


def decode(data: bytes) -> Manifest:
    """Parse and check a manifest: structure, names, paths, sizes and the stated root."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _fail(f"not a {FORMAT} document")
    model, version = doc.get("model"), doc.get("version")
    if not (isinstance(model, str) and isinstance(version, str)):
        raise _fail("model and version must be strings")
    name = f"manifest {model}/{version}"
    if not (valid_name(model) and valid_name(version)):
        raise _fail("unsafe model or version name", name)
    packs = doc.get("packs")
    if not isinstance(packs, list) or not all(isinstance(p, str) for p in packs):
        raise _fail("packs must be a list of keys", name)
    files = tuple(_file(f, len(packs), name) for f in doc.get("files") or [])
    if len({f.path for f in files}) != len(files):
        raise _fail("duplicate file paths", name)
    m = Manifest(
        model=model,
        version=version,
        files=files,
        packs=tuple(packs),
        chunking=str(doc.get("chunking", "")),
        created_at=float(doc.get("created_at", 0.0)),
        source_time=float(doc.get("source_time", 0.0)),
    )
    if m.root().hex() != doc.get("root"):
        raise _fail("stated root does not match the listed content", name)
    return m


@dataclass(frozen=True)
class Tombstone:
    """A version deleted at the source (a stream record like a manifest)."""

    model: str
    version: str
    deleted_at: float

    @property
    def name(self) -> str:
        return f"{self.model}/{self.version}"


def encode_tombstone(t: Tombstone) -> bytes:
    doc = {
        "format": DELETE_FORMAT,
        "model": t.model,
        "version": t.version,
        "deleted_at": t.deleted_at,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def decode_record(data: bytes) -> Manifest | Tombstone:
    """A stream record: a manifest or a tombstone. Raises ``IntegrityError`` if neither."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != DELETE_FORMAT:
        return decode(data)
    model, version, at = doc.get("model"), doc.get("version"), doc.get("deleted_at")
    if not (isinstance(model, str) and isinstance(version, str) and isinstance(at, int | float)):
        raise _fail("tombstone needs model, version and deleted_at", "tombstone")
    if not (valid_name(model) and valid_name(version)):
        raise _fail("unsafe model or version name", f"tombstone {model}/{version}")
    return Tombstone(model, version, float(at))


def locate(m: Manifest) -> dict[str, list[tuple[FileEntry, int, int, ChunkRef]]]:
    """Group every chunk occurrence by pack: ``{pack key: [(file, chunk index, offset, ref)]}``.

    Reading each pack once and writing its chunks where they belong assembles
    the version with one fetch per pack.
    """
    out: dict[str, list[tuple[FileEntry, int, int, ChunkRef]]] = {}
    for f in m.files:
        for i, (offset, ref) in enumerate(zip(f.offsets(), f.chunks, strict=True)):
            out.setdefault(m.packs[ref.pack], []).append((f, i, offset, ref))
    return out


def lengths_by_record(manifests: Sequence[Manifest], pack: str) -> dict[int, int]:
    """Record lengths of ``pack`` known from ``manifests`` (to map a bad frame to chunks)."""
    out: dict[int, int] = {}
    for m in manifests:
        if pack not in m.packs:
            continue
        index = m.packs.index(pack)
        for f in m.files:
            for c in f.chunks:
                if c.pack == index:
                    out[c.record] = c.length
    return out
