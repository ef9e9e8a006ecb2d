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
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import xxhash

from replicators.errors import IntegrityError

_LEN = struct.Struct(">I")
_VERSION = re.compile(r"([0-9]{1,20})\.([0-9]{1,20})")
META_HASH = "dragent-xxh3"
META_VERSION = "dragent-version"


@dataclass(frozen=True, order=True, slots=True)
class Version:
    time_ns: int
    seq: int

    def encode(self) -> str:
        return f"{self.time_ns}.{self.seq}"

    @classmethod
    def decode(cls, text: object) -> Version:
        """Parse ``TIME.SEQ`` (ASCII digits, at most 20 each); raises ``IntegrityError`` on
        anything else, a value that is not a string included."""
        match = _VERSION.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise IntegrityError(f"not an object version: {text!r:.80}")
        return cls(int(match.group(1)), int(match.group(2)))


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
    def from_json(cls, d: Any) -> Head:
        """``to_json`` reversed; raises ``ValueError`` naming the field that is malformed."""
        if not isinstance(d, dict):
            raise ValueError("head is not an object")
        size, ct, meta, digest = (d.get(name) for name in ("size", "ct", "meta", "hash"))
        if not _count(size):
            raise ValueError(f"head size {size!r:.40} is not a non-negative integer")
        if not (isinstance(ct, str) and isinstance(digest, str)):
            raise ValueError("head content type and hash must be strings")
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise ValueError("head metadata must map strings to strings")
        for text in (ct, digest, *meta, *meta.values()):
            _utf8(text, "head")
        return cls(size, ct, dict(meta), digest)


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


def _count(value: Any) -> bool:
    """Is ``value`` a JSON integer (not a bool, not a float) that is zero or more?"""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _utf8(text: str, what: str) -> None:
    """A string decoded from JSON may hold lone surrogates, which no store accepts."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{what} holds a lone surrogate (not UTF-8)") from None


def decode(data: bytes) -> Record:
    """Parse one record; raises ``IntegrityError`` naming what is malformed.

    Every field is checked for its type and range (the key a non-empty string, the
    version ``TIME.SEQ``, sizes and part numbers non-negative integers, a part's index
    below its count, strings valid UTF-8), so a record that decodes can be applied as it is.
    """
    if len(data) < 1 + _LEN.size:
        raise IntegrityError("objects record shorter than its header")
    tag = data[:1]
    if tag not in (b"P", b"R", b"D"):
        raise IntegrityError(f"unknown objects record tag {tag!r}")
    (length,) = _LEN.unpack_from(data, 1)
    start = 1 + _LEN.size
    if start + length > len(data):
        raise IntegrityError(f"objects record header of {length} bytes runs past the record")
    try:
        h = json.loads(data[start : start + length])
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"malformed objects record: header is not JSON: {exc}") from None
    body = data[start + length :]
    try:
        return _record(tag, h, body)
    except ValueError as exc:
        raise IntegrityError(f"malformed objects record: {exc}") from None


def _record(tag: bytes, h: Any, body: bytes) -> Record:
    if not isinstance(h, dict):
        raise ValueError("header is not an object")
    key = h.get("k")
    if not isinstance(key, str) or not key:
        raise ValueError("key is missing or not a non-empty string")
    _utf8(key, "key")
    version = Version.decode(h.get("v"))
    if tag == b"D":
        if body:
            raise ValueError(f"delete of {key!r} carries {len(body)} bytes")
        return Delete(key, version)
    head = Head.from_json(h.get("h"))
    if tag == b"P":
        if len(body) != head.size:
            raise IntegrityError(f"object {key!r}: {len(body)} bytes, header says {head.size}")
        return Put(key, version, head, body)
    index, count, offset = h.get("i"), h.get("n"), h.get("o")
    if not (_count(index) and _count(count) and _count(offset)):
        raise ValueError(f"part of {key!r}: index, count and offset must be integers >= 0")
    if not index < count:
        raise ValueError(f"part of {key!r}: index {index} is not below its count {count}")
    return Part(key, version, head, index, count, offset, body)


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
