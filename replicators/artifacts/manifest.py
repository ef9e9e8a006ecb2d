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
import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from replicators.errors import IntegrityError
from verifiers.merkle import leaf_hash, merkle_root

FORMAT = "dragent-artifact-manifest/1"
DELETE_FORMAT = "dragent-artifact-delete/1"
_U16, _U32, _U64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")
_NAME = re.compile(r"[A-Za-z0-9._-][A-Za-z0-9._@+=-]{0,254}")
MAX_PATH, MAX_COMPONENT = 4096, 255
"""Bytes of UTF-8 a file path and each of its components may have (Linux's limits)."""


def valid_name(name: str) -> bool:
    """A model or version name: one path component, no ``..``, no leading dot."""
    return bool(_NAME.fullmatch(name)) and not name.startswith(".") and name not in ("", "..")


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
        return manifest_root(self.files)


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


def _uint(value: Any, bits: int) -> bool:
    """Is ``value`` a JSON integer (not a bool) in ``[0, 2**bits)``?"""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << bits


def _time(doc: dict[str, Any], name: str, where: str) -> float:
    value = doc.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(f"{name} {value!r:.40} is not a time", where)
    return float(value)


def _shown(text: str) -> str:
    """``text`` for a message: as it is if it is UTF-8, else escaped (a lone surrogate
    would make the log line itself fail)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return ascii(text)
    return text


def _path_fits(path: str) -> str | None:
    """Why ``path`` cannot be written as a file here (not UTF-8, too long), or None."""
    try:
        raw = path.encode()
    except UnicodeEncodeError:
        return "file path is not UTF-8"
    if len(raw) > MAX_PATH or max(len(p) for p in raw.split(b"/")) > MAX_COMPONENT:
        return f"file path longer than {MAX_PATH} bytes or a component longer than {MAX_COMPONENT}"
    return None


def _chunk(raw: Any, npacks: int, where: str) -> ChunkRef:
    if not (isinstance(raw, list) and len(raw) == 4 and isinstance(raw[0], str)):
        raise _fail("chunk entry is not [id, length, pack, record]", where)
    cid, length, pack, record = raw
    try:
        ident = bytes.fromhex(cid)
    except ValueError:
        raise _fail(f"chunk id {cid!r} is not hex", where) from None
    ints = _uint(length, 32) and _uint(pack, 32) and _uint(record, 32)
    if len(ident) != 32 or not ints or length <= 0 or not pack < npacks:
        raise _fail(f"bad chunk entry {raw!r}", where)
    return ChunkRef(ident, length, pack, record)


def _file(raw: Any, npacks: int, name: str) -> FileEntry:
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str):
        raise _fail("file entry without a path", name)
    path = raw["path"]
    where = f"{name} file {_shown(path[:300])}"
    if not valid_path(path):
        raise _fail("unsafe file path", where)
    if (why := _path_fits(path)) is not None:
        raise _fail(why, where)
    size, mode, chunks = raw.get("size"), raw.get("mode"), raw.get("chunks")
    if not (_uint(size, 64) and _uint(mode, 32) and isinstance(chunks, list)):
        raise _fail("file entry needs size, mode and chunks", where)
    refs = tuple(_chunk(c, npacks, where) for c in chunks)
    if sum(c.length for c in refs) != size:
        raise _fail(f"chunk lengths add up to {sum(c.length for c in refs)}, size is {size}", where)
    return FileEntry(path, size, mode, refs)


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise _fail(f"not JSON: {exc}") from None


def _overlaps(files: tuple[FileEntry, ...]) -> str | None:
    """A path listed twice, or listed as a file and also as the directory of another."""
    paths = {f.path for f in files}
    if len(paths) != len(files):
        return "duplicate file paths"
    for f in files:
        parts = f.path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in paths:
                return f"{'/'.join(parts[:i])!r} is both a file and a directory"
    return None


def decode(data: bytes) -> Manifest:
    """Parse and check a manifest: structure, names, paths, sizes and the stated root.

    Raises ``IntegrityError`` for anything that could not be materialized as it is:
    a field of the wrong type or out of range, an unsafe name or path, a path too long
    for a file system, a path that is both a file and a directory.
    """
    return _manifest(_json(data))


def _manifest(doc: Any) -> Manifest:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _fail(f"not a {FORMAT} document")
    model, version = doc.get("model"), doc.get("version")
    if not (isinstance(model, str) and isinstance(version, str)):
        raise _fail("model and version must be strings")
    name = f"manifest {_shown(model[:300])}/{_shown(version[:300])}"
    if not (valid_name(model) and valid_name(version)):
        raise _fail("unsafe model or version name", name)
    packs = doc.get("packs")
    if not isinstance(packs, list) or not all(isinstance(p, str) for p in packs):
        raise _fail("packs must be a list of keys", name)
    listed, chunking = doc.get("files") or [], doc.get("chunking", "")
    if not isinstance(listed, list) or not isinstance(chunking, str):
        raise _fail("files must be a list and chunking a string", name)
    files = tuple(_file(f, len(packs), name) for f in listed)
    if (why := _overlaps(files)) is not None:
        raise _fail(why, name)
    m = Manifest(
        model=model,
        version=version,
        files=files,
        packs=tuple(packs),
        chunking=chunking,
        created_at=_time(doc, "created_at", name),
        source_time=_time(doc, "source_time", name),
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
    doc = _json(data)
    if not isinstance(doc, dict) or doc.get("format") != DELETE_FORMAT:
        return _manifest(doc)
    model, version = doc.get("model"), doc.get("version")
    if not (isinstance(model, str) and isinstance(version, str) and "deleted_at" in doc):
        raise _fail("tombstone needs model, version and deleted_at", "tombstone")
    where = f"tombstone {_shown(model[:300])}/{_shown(version[:300])}"
    if not (valid_name(model) and valid_name(version)):
        raise _fail("unsafe model or version name", where)
    return Tombstone(model, version, _time(doc, "deleted_at", where))


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
