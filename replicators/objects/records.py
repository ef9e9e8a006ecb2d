"""Records of the ``objects`` stream: put-inline, put-part, delete. Pure encoding.

Layout of one record: a tag byte (``P`` put, ``R`` part, ``D`` delete), a
4-byte big-endian header length, a UTF-8 JSON header, then the body bytes
(the object's bytes for ``P``, the part's bytes for ``R``, nothing for ``D``).

Every record names its key and its ``Version``. A version orders the states
of one key: ``(time_ns, seq)`` compared lexicographically, where ``time_ns``
is the source's LastModified for a put (the time the absence was observed
for a delete) and ``seq`` is the capture sequence (the record's position in
the stream), so of two captures with the same timestamp the later wins.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import xxhash

from replicators.errors import IntegrityError

_LEN = struct.Struct(">I")
META_HASH = "dragent-xxh3"
META_VERSION = "dragent-version"


@dataclass(frozen=True, order=True, slots=True)
class Version:
    time_ns: int
    seq: int

    def encode(self) -> str:
        return f"{self.time_ns}.{self.seq}"

    @classmethod
    def decode(cls, text: str) -> Version:
        """Parse ``TIME.SEQ``; raises ``IntegrityError`` on anything else."""
        time_ns, sep, seq = text.partition(".")
        if not sep or not time_ns.isdigit() or not seq.isdigit():
            raise IntegrityError(f"not an object version: {text!r}")
        return cls(int(time_ns), int(seq))


@dataclass(frozen=True, slots=True)
class Head:
    """What the mirror object carries besides its bytes."""

    size: int
    content_type: str
    metadata: dict[str, str]
    content_hash: str
    """xxh3-128 of the whole object, 32 hex digits."""

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "ct": self.content_type,
            "meta": self.metadata,
            "hash": self.content_hash,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Head:
        return cls(int(d["size"]), str(d["ct"]), dict(d["meta"]), str(d["hash"]))


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    version: Version
    head: Head
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Part:
    """Part ``index`` (from 0) of ``count`` of a large object, at byte ``offset``."""

    key: str
    version: Version
    head: Head
    index: int
    count: int
    offset: int
    body: bytes = field(repr=False)

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    version: Version


Record = Put | Part | Delete


def encode(record: Record) -> bytes:
    header: dict[str, Any] = {"k": record.key, "v": record.version.encode()}
    body = b""
    if isinstance(record, Put):
        tag, body = b"P", record.body
        header["h"] = record.head.to_json()
    elif isinstance(record, Part):
        tag, body = b"R", record.body
        header |= {"h": record.head.to_json(), "i": record.index, "n": record.count}
        header["o"] = record.offset
    else:
        tag = b"D"
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return tag + _LEN.pack(len(raw)) + raw + body


def decode(data: bytes) -> Record:
    """Parse one record; raises ``IntegrityError`` naming what is malformed."""
    if len(data) < 1 + _LEN.size:
        raise IntegrityError("objects record shorter than its header")
    tag = data[:1]
    (length,) = _LEN.unpack_from(data, 1)
    start = 1 + _LEN.size
    try:
        h = json.loads(data[start : start + length])
        key, version = str(h["k"]), Version.decode(h["v"])
        body = data[start + length :]
        if tag == b"D":
            return Delete(key, version)
        head = Head.from_json(h["h"])
        if tag == b"P":
            if len(body) != head.size:
                raise IntegrityError(f"object {key!r}: {len(body)} bytes, header says {head.size}")
            return Put(key, version, head, body)
        if tag == b"R":
            return Part(key, version, head, int(h["i"]), int(h["n"]), int(h["o"]), body)
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"malformed objects record: {exc}") from None
    raise IntegrityError(f"unknown objects record tag {tag!r}")


def part_count(size: int, part_size: int) -> int:
    return max(1, -(-size // part_size))


def content_hash(data: bytes) -> str:
    """The content hash kept in the mirror's metadata: xxh3-128, 32 hex digits."""
    return xxhash.xxh3_128_hexdigest(data)


def user_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The user metadata an object carries, without ours (``dragent-*``)."""
    return {k: v for k, v in metadata.items() if not k.startswith("dragent-")}


def meta_fingerprint(content_type: str, metadata: dict[str, str]) -> str:
    """xxh3-64 (hex) of the content type and user metadata: tells a metadata-only rewrite."""
    canon = json.dumps([content_type, user_metadata(metadata)], sort_keys=True)
    return xxhash.xxh3_64_hexdigest(canon.encode())
