"""Segments: seal a batch of records into one encrypted, verifiable blob, and open it.

docs/segment-format.md (version 1) is the specification; this module is its
implementation. In short: a header (magic, version, identity, source range,
key id, wrapped data key, salt, key commitment, checksum), AES-256-GCM frames
of the length-prefixed record stream (each zstd-compressed when that pays)
under a per-segment key derived with HKDF-SHA256, and a footer with the record
count and the xxh3-128 Merkle root, authenticated by the final frame.

Pure and synchronous: no I/O, no clock (``created_at`` is passed in), no
logging. Safe to call from worker threads (``asyncio.to_thread``): zstd
contexts, which are not thread-safe, are kept per thread.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from replicators.errors import IntegrityError
from replicators.segment_records import (
    FLAG_ZSTD,
    _chunks,
    _compressor,
    _decompressor,
    _encode_chunk,
    _inflate,
    _split_records,
)
from verifiers.merkle import leaf_hash, merkle_root

VERSION = 1
MAGIC = b"\x89DRSEG\r\n"
FOOTER_MAGIC = b"DRSEGEND"
FLAG_FINAL = 0x01
MIN_FRAME_SIZE, MAX_FRAME_SIZE = 64, 64 << 20
KEY_SIZE, TAG_SIZE, CHECKSUM_SIZE = 32, 16, 16

_SUITE_V1 = (1, 1, 1, 1)  # ids of aead, kdf, compression, merkle: the only suite of v1
_SUITE_NAMES = ("aead", "kdf", "compression", "merkle")
_FIXED = struct.Struct(">8sHHBBBBQQQIddd32s32s")  # the header before its variable fields
_PREFIX = struct.Struct(">8sHH")  # magic, version, header_len
_FRAME = struct.Struct(">BI")  # flags, ciphertext length
_FOOTER = struct.Struct(">8sQQ16s")  # magic, record_count, stream_len, root
_AAD = struct.Struct(">18s32sQQIB")  # label, header digest, epoch, seq, frame index, flags
_U16, _U32, _U64X2 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">QQ")
# variable header fields: name, min and max length in bytes
_FIELDS = (("stream", 1, 255), ("start", 0, 255), ("end", 0, 255), ("key_id", 1, 2048))
_WRAPPED = ("wrapped_key", 1, 8192)
MIN_HEADER_SIZE = _FIXED.size + 2 * 5 + 3 + CHECKSUM_SIZE

_AAD_LABEL = b"dragent-segment-v1"
_KEY_INFO = b"dragent-segment-v1 key"
_COMMIT_INFO = b"dragent-segment-v1 commit"


@dataclass(frozen=True, repr=False)
class DataKey:
    """A data key: its plaintext (never shown by repr) and its wrapped form."""

    key_id: str
    plaintext: bytes
    wrapped: bytes

    def __repr__(self) -> str:
        sizes = f"plaintext=<{len(self.plaintext)} bytes>, wrapped=<{len(self.wrapped)} bytes>"
        return f"DataKey(key_id={self.key_id!r}, {sizes})"

    __str__ = __repr__


@dataclass(frozen=True)
class SegmentHeader:
    """A parsed header. Nothing in it is authenticated until ``open_segment`` succeeds."""

    version: int
    stream: str
    epoch: int
    seq: int
    start: str
    end: str
    first_source_time: float
    last_source_time: float
    record_count: int
    created_at: float
    key_id: str
    wrapped_key: bytes = field(repr=False)
    salt: bytes = field(repr=False)
    commitment: bytes = field(repr=False)
    frame_size: int
    aead: str = "AES-256-GCM"
    kdf: str = "HKDF-SHA256"
    compression: str = "zstd"
    merkle: str = "xxh3-128 RFC 9162"

    @property
    def where(self) -> str:
        """How error messages name this segment: ``segment <stream>/<epoch>/<seq>``."""
        return f"segment {self.stream}/{self.epoch}/{self.seq}"


@dataclass(frozen=True)
class OpenedSegment:
    """A fully verified segment: its header, its records in order, its Merkle root."""

    header: SegmentHeader
    records: list[bytes] = field(repr=False)
    root: bytes


def _bad(where: str, message: str, hint: str = "") -> IntegrityError:
    return IntegrityError(message, where=where, hint=hint)


# --- header -------------------------------------------------------------------------------


def _encode_header(h: SegmentHeader) -> bytes:
    values = [*(s.encode() for s in (h.stream, h.start, h.end, h.key_id)), h.wrapped_key]
    for raw, (name, low, high) in zip(values, (*_FIELDS, _WRAPPED), strict=True):
        if not low <= len(raw) <= high:
            raise ValueError(f"{name} must be {low}..{high} bytes")
    var = b"".join(_U16.pack(len(raw)) + raw for raw in values)
    size = _FIXED.size + len(var) + CHECKSUM_SIZE
    body = _FIXED.pack(
        MAGIC, h.version, size, *_SUITE_V1, h.epoch, h.seq, h.record_count, h.frame_size,
        h.created_at, h.first_source_time, h.last_source_time, h.salt, h.commitment,
    ) + var  # fmt: skip
    return body + xxhash.xxh3_128_digest(body)


def _decode_header(blob: bytes | memoryview) -> tuple[SegmentHeader, int]:
    """Step 1: parse and check the header; return it and its length in bytes."""
    where = "segment header"
    if len(blob) < _PREFIX.size:
        raise _bad(where, f"truncated: {len(blob)} bytes is too short for a segment")
    magic, version, size = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise _bad(where, "not a segment (bad magic)")
    if version != VERSION:
        raise _bad(where, f"unsupported format version {version}")
    if size < MIN_HEADER_SIZE:
        raise _bad(where, f"bad header: header_len {size} is too small")
    if len(blob) < size:
        raise _bad(where, f"truncated: header needs {size} bytes, have {len(blob)}")
    body = bytes(blob[: size - CHECKSUM_SIZE])
    if xxhash.xxh3_128_digest(body) != blob[size - CHECKSUM_SIZE : size]:
        raise _bad(where, "header checksum mismatch (damaged header)")
    return _header_fields(body), size


def _header_fields(body: bytes) -> SegmentHeader:
    (_, version, _, *suite, epoch, seq, count, frame_size,
     created, first, last, salt, commitment) = _FIXED.unpack_from(body)  # fmt: skip
    for name, got, want in zip(_SUITE_NAMES, suite, _SUITE_V1, strict=True):
        if got != want:
            raise _bad("segment header", f"unsupported {name} id {got}")
    if not MIN_FRAME_SIZE <= frame_size <= MAX_FRAME_SIZE:
        raise _bad("segment header", f"bad header: frame_size {frame_size} out of range")
    *texts, wrapped = _variable_fields(body, _FIXED.size)
    try:
        stream, start, end, key_id = (raw.decode() for raw in texts)
    except UnicodeDecodeError:
        raise _bad("segment header", "bad header: text field is not UTF-8") from None
    return SegmentHeader(
        version=version, stream=stream, epoch=epoch, seq=seq, start=start, end=end,
        first_source_time=first, last_source_time=last, record_count=count,
        created_at=created, key_id=key_id, wrapped_key=wrapped, salt=salt,
        commitment=commitment, frame_size=frame_size,
    )  # fmt: skip


def _variable_fields(body: bytes, offset: int) -> list[bytes]:
    out = []
    for name, low, high in (*_FIELDS, _WRAPPED):
        if offset + 2 > len(body):
            raise _bad("segment header", f"bad header: {name} cut short")
        (length,) = _U16.unpack_from(body, offset)
        offset += 2
        if not low <= length <= high or offset + length > len(body):
            raise _bad("segment header", f"bad header: {name} length {length}")
        out.append(body[offset : offset + length])
        offset += length
    if offset != len(body):
        raise _bad("segment header", "bad header: fields do not fill header_len")
    return out


def read_header(blob: bytes) -> SegmentHeader:
    """Parse and check a segment's header without a key (to learn ``key_id``/``wrapped_key``).

    Checks magic, version, length, checksum, algorithm ids and field bounds.
    Raises ``IntegrityError`` on garbage, truncation, a bad magic or an unknown
    version. Nothing in the header is authenticated until ``open_segment``.
    """
    return _decode_header(blob)[0]


# --- keys and authentication ----------------------------------------------------------------


def _hkdf(data_key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(data_key)


def derive_keys(
    data_key: bytes, salt: bytes, stream: str, epoch: int, seq: int
) -> tuple[bytes, bytes]:
    """Return ``(segment key, key commitment)`` for one segment (spec, "Keys")."""
    raw = stream.encode()
    ctx = _U16.pack(VERSION) + _U16.pack(len(raw)) + raw + _U64X2.pack(epoch, seq)
    return _hkdf(data_key, salt, _KEY_INFO + ctx), _hkdf(data_key, salt, _COMMIT_INFO + ctx)


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


@dataclass(frozen=True)
class _Frames:
    """What every frame's nonce and AAD depend on, and the segment key."""

    h: SegmentHeader
    digest: bytes  # SHA-256 of the header bytes
    footer: bytes
    aead: AESGCM

    def aad(self, index: int, flags: int) -> bytes:
        h, raw = self.h, self.h.stream.encode()
        fixed = _AAD.pack(_AAD_LABEL, self.digest, h.epoch, h.seq, index, flags)
        return fixed + _U16.pack(len(raw)) + raw + (self.footer if flags & FLAG_FINAL else b"")


# --- seal ---------------------------------------------------------------------------------


def seal(
    records: Sequence[bytes],
    *,
    stream: str,
    epoch: int,
    seq: int,
    start: str,
    end: str,
    first_source_time: float,
    last_source_time: float,
    data_key: DataKey,
    created_at: float,
    frame_size: int = 1 << 20,
    level: int = 3,
) -> bytes:
    """Seal ``records`` (in order; may be empty: a heartbeat) into one segment.

    ``data_key`` is used only through a per-segment HKDF key with a fresh random
    salt, so one data key may seal many segments. ``level`` is the zstd level;
    chunks that zstd does not shrink by 1/8 are stored raw. Raises ``ValueError``
    for what the format cannot carry: frame_size outside 64 B..64 MiB, a field
    too long, epoch or seq outside 64 bits, a record of 4 GiB or more, a data
    key that is not 32 bytes.
    """
    if not MIN_FRAME_SIZE <= frame_size <= MAX_FRAME_SIZE:
        raise ValueError(f"frame_size must be {MIN_FRAME_SIZE}..{MAX_FRAME_SIZE}")
    if not (0 <= epoch < 1 << 64 and 0 <= seq < 1 << 64) or len(data_key.plaintext) != KEY_SIZE:
        raise ValueError("epoch and seq must fit in 64 bits and the data key be 32 bytes")
    if max(map(len, records), default=0) >= 1 << 32:
        raise ValueError("a record must be shorter than 4 GiB")
    salt = os.urandom(32)
    seg_key, commitment = derive_keys(data_key.plaintext, salt, stream, epoch, seq)
    header = SegmentHeader(
        version=VERSION, stream=stream, epoch=epoch, seq=seq, start=start, end=end,
        first_source_time=first_source_time, last_source_time=last_source_time,
        record_count=len(records), created_at=created_at, key_id=data_key.key_id,
        wrapped_key=data_key.wrapped, salt=salt, commitment=commitment, frame_size=frame_size,
    )  # fmt: skip
    header_bytes = _encode_header(header)
    stream_len = sum(map(len, records)) + 4 * len(records)
    root = merkle_root([leaf_hash(r) for r in records])
    footer = _FOOTER.pack(FOOTER_MAGIC, len(records), stream_len, root)
    ctx = _Frames(header, hashlib.sha256(header_bytes).digest(), footer, AESGCM(seg_key))
    last = max(1, -(-stream_len // frame_size)) - 1
    return b"".join([header_bytes, *_seal_frames(records, ctx, last, level), footer])


def _seal_frames(records: Sequence[bytes], ctx: _Frames, last: int, level: int) -> list[bytes]:
    cctx, out = _compressor(level), []
    for i, chunk in enumerate(_chunks(records, ctx.h.frame_size)):
        payload, flags = _encode_chunk(chunk, cctx)
        flags |= FLAG_FINAL if i == last else 0
        sealed = ctx.aead.encrypt(_nonce(i), payload, ctx.aad(i, flags))
        out += (_FRAME.pack(flags, len(sealed)), sealed)
    return out


# --- open ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    frames: list[tuple[int, int, int]]  # (flags, start, end) of each ciphertext
    footer: bytes
    stream_len: int
    root: bytes


def _walk(blob: memoryview, offset: int, h: SegmentHeader) -> _Layout:
    """Step 3: frame structure and footer, without the key."""
    frames: list[tuple[int, int, int]] = []
    while True:
        i = len(frames)
        if offset == len(blob):
            raise _bad(h.where, "truncated: final frame missing")
        if offset + _FRAME.size > len(blob):
            raise _bad(h.where, f"truncated: frame {i} cut short")
        flags, length = _FRAME.unpack_from(blob, offset)
        if flags & ~(FLAG_FINAL | FLAG_ZSTD):
            raise _bad(h.where, f"frame {i}: unknown flag bits {flags:#04x}")
        if not TAG_SIZE <= length <= h.frame_size + TAG_SIZE:
            raise _bad(h.where, f"frame {i}: bad length {length}")
        offset += _FRAME.size
        if offset + length > len(blob):
            raise _bad(h.where, f"truncated: frame {i} cut short")
        frames.append((flags, offset, offset + length))
        offset += length
        if flags & FLAG_FINAL:
            return _footer(blob, offset, frames, h)


def _footer(
    blob: memoryview, offset: int, frames: list[tuple[int, int, int]], h: SegmentHeader
) -> _Layout:
    rest = len(blob) - offset
    if rest < _FOOTER.size:
        raise _bad(h.where, "truncated: footer cut short")
    if rest > _FOOTER.size:
        raise _bad(h.where, f"{rest - _FOOTER.size} trailing bytes after the footer")
    footer = bytes(blob[offset:])
    magic, count, stream_len, root = _FOOTER.unpack(footer)
    if magic != FOOTER_MAGIC:
        raise _bad(h.where, "footer magic mismatch")
    if count != h.record_count:
        raise _bad(h.where, f"record count mismatch: header {h.record_count}, footer {count}")
    if len(frames) != max(1, -(-stream_len // h.frame_size)):
        raise _bad(h.where, f"frame count {len(frames)} does not match stream length {stream_len}")
    return _Layout(frames, footer, stream_len, root)


def _check_expected(
    h: SegmentHeader, stream: str | None, epoch: int | None, seq: int | None
) -> None:
    """Step 2: is this the segment the caller asked for?"""
    checks = (("stream", stream, h.stream), ("epoch", epoch, h.epoch), ("seq", seq, h.seq))
    for name, want, got in checks:
        if want is not None and want != got:
            raise _bad(h.where, f"expected {name} {want!r}, header says {got!r}")


def _check_key(h: SegmentHeader, data_key: bytes) -> bytes:
    """Step 4: key commitment, before any decryption. Returns the segment key."""
    if len(data_key) != KEY_SIZE:
        raise _bad(h.where, f"wrong key (data key is {len(data_key)} bytes, not {KEY_SIZE})")
    seg_key, commitment = derive_keys(data_key, h.salt, h.stream, h.epoch, h.seq)
    if not hmac.compare_digest(commitment, h.commitment):
        hint = "the data key does not belong to this segment: check the key id and KEK version"
        raise _bad(h.where, "wrong key (commitment mismatch)", hint)
    return seg_key


def _open_frames(blob: memoryview, ctx: _Frames, lay: _Layout) -> list[bytes]:
    """Steps 5 and 6: authenticate and decode every frame in index order; return the chunks."""
    h, dctx, last, chunks = ctx.h, _decompressor(), len(lay.frames) - 1, []
    for i, (flags, lo, hi) in enumerate(lay.frames):
        try:
            plain = ctx.aead.decrypt(_nonce(i), blob[lo:hi], ctx.aad(i, flags))
        except InvalidTag:
            why = "failed authentication (tampered, reordered, spliced or truncated)"
            raise _bad(h.where, f"frame {i} {why}") from None
        if flags & FLAG_ZSTD:
            plain = _inflate(plain, h, i, dctx)
        if i < last and len(plain) != h.frame_size:
            why = f"plaintext is {len(plain)} bytes, expected {h.frame_size}"
            raise _bad(h.where, f"frame {i}: {why}")
        chunks.append(plain)
    total = sum(map(len, chunks))
    if total != lay.stream_len:
        raise _bad(h.where, f"record stream is {total} bytes, footer says {lay.stream_len}")
    return chunks


def open_segment(
    blob: bytes,
    data_key_plaintext: bytes,
    *,
    expect_stream: str | None = None,
    expect_epoch: int | None = None,
    expect_seq: int | None = None,
) -> OpenedSegment:
    """Verify ``blob`` completely and return its records; nothing is returned on any doubt.

    Checks, in order (spec, "Reading"): header, expected stream/epoch/seq,
    frame structure and footer, key commitment, every frame's tag in index
    order, chunk lengths, record framing, record count, Merkle root. Raises
    ``IntegrityError`` naming the segment and what failed (e.g. ``wrong key
    (commitment mismatch)``, ``frame 3 failed authentication``, ``truncated:
    final frame missing``, ``merkle root mismatch``), and nothing else for bad
    bytes.
    """
    view = memoryview(blob)
    header, header_len = _decode_header(view)
    _check_expected(header, expect_stream, expect_epoch, expect_seq)
    layout = _walk(view, header_len, header)
    seg_key = _check_key(header, data_key_plaintext)
    ctx = _Frames(
        header, hashlib.sha256(view[:header_len]).digest(), layout.footer, AESGCM(seg_key)
    )
    records = _split_records(_open_frames(view, ctx, layout), header)
    if len(records) != header.record_count:
        why = f"footer {header.record_count}, found {len(records)}"
        raise _bad(header.where, f"record count mismatch: {why}")
    root = merkle_root([leaf_hash(r) for r in records])
    if root != layout.root:
        raise _bad(header.where, "merkle root mismatch")
    return OpenedSegment(header=header, records=records, root=root)
