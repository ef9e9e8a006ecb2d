"""The record stream of a segment, apart from its encryption: the length-prefixed
records cut into frame-sized chunks and put back together, and each chunk's compression
(the writer's keep-or-not policy, zstd contexts kept per thread, and the strict checks of
a compressed frame). docs/segment-format.md, "Records"; ``replicators.segment`` seals
and opens segments with it. Pure and synchronous."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import zstandard

from replicators.errors import IntegrityError

if TYPE_CHECKING:
    from replicators.segment import SegmentHeader

FLAG_ZSTD = 0x02
_U32 = struct.Struct(">I")


def _bad(where: str, message: str) -> IntegrityError:
    return IntegrityError(message, where=where)


# Writer policy (spec, "Records"): keep zstd only when it saves at least 1/8;
# chunks over 64 KiB are judged on a 32 KiB sample before being compressed whole.
_KEEP_NUM, _KEEP_DEN = 7, 8
_SAMPLE_SLICES, _SAMPLE_SLICE, _SAMPLE_OVER = 4, 8 << 10, 64 << 10


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("cctx", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=False)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "dctx"):
        _local.dctx = zstandard.ZstdDecompressor()
    dctx: zstandard.ZstdDecompressor = _local.dctx
    return dctx


def _worth_it(packed: int, raw: int) -> bool:
    return packed * _KEEP_DEN <= raw * _KEEP_NUM


def _encode_chunk(chunk: bytes, cctx: zstandard.ZstdCompressor) -> tuple[bytes, int]:
    """The frame plaintext for one chunk and its ZSTD flag (writer policy)."""
    size = len(chunk)
    if size > _SAMPLE_OVER:
        view, step = memoryview(chunk), size // _SAMPLE_SLICES
        sample = b"".join(view[i * step : i * step + _SAMPLE_SLICE] for i in range(_SAMPLE_SLICES))
        if not _worth_it(len(cctx.compress(sample)), len(sample)):
            return chunk, 0
    packed = cctx.compress(chunk) if size else b""
    return (packed, FLAG_ZSTD) if size and _worth_it(len(packed), size) else (chunk, 0)


def _chunks(records: Sequence[bytes], size: int) -> Iterator[bytes]:
    """Cut the length-prefixed record stream into ``size``-byte chunks, never building it
    whole: one chunk at a time is in memory. Yields at least one (possibly empty) chunk."""
    parts: list[bytes | memoryview] = []
    fill, pack, emitted = 0, _U32.pack, False
    for record in records:
        for piece in (pack(len(record)), record):
            if not piece:
                continue  # an empty record adds only its length prefix
            if fill + len(piece) < size:  # the common case: the piece fits in this chunk
                parts.append(piece)
                fill += len(piece)
                continue
            view = memoryview(piece)
            while fill + len(view) >= size:
                parts.append(view[: size - fill])
                yield b"".join(parts)
                view, parts, fill, emitted = view[size - fill :], [], 0, True
            if view:
                parts.append(view)
                fill = len(view)
    if fill or not emitted:
        yield b"".join(parts)


def _inflate(
    packed: bytes, h: SegmentHeader, index: int, dctx: zstandard.ZstdDecompressor
) -> bytes:
    try:
        size = zstandard.frame_content_size(packed)
        if not 0 <= size <= h.frame_size:  # -1: size not declared
            raise IntegrityError(
                where=h.where, message=f"frame {index}: bad zstd frame (content size {size})"
            )
        inflater = dctx.decompressobj()
        plain = inflater.decompress(packed)
    except zstandard.ZstdError as exc:
        raise IntegrityError(
            where=h.where, message=f"frame {index}: bad zstd frame ({exc})"
        ) from None
    if len(plain) != size or not inflater.eof:
        raise IntegrityError(
            where=h.where, message=f"frame {index}: bad zstd frame (size mismatch)"
        )
    if extra := len(inflater.unused_data):
        raise IntegrityError(
            where=h.where, message=f"frame {index}: {extra} bytes after the zstd frame"
        )
    return plain


def _gather(chunks: list[bytes], size: int, offset: int, length: int) -> bytes:
    """Bytes ``[offset, offset + length)`` of the record stream, across chunk boundaries."""
    index, pos = divmod(offset, size)
    parts = []
    while length > 0:
        piece = chunks[index][pos : pos + length]
        parts.append(piece)
        length -= len(piece)
        index, pos = index + 1, 0
    return b"".join(parts)


def _split_records(chunks: list[bytes], h: SegmentHeader) -> list[bytes]:
    """Step 7: undo the length prefixes, cutting records straight out of the chunks (every
    chunk but the last is ``frame_size`` bytes). Chunks are released once passed, so the
    records and the chunks together stay about one record stream in size."""
    records: list[bytes] = []
    append, unpack, size = records.append, _U32.unpack_from, h.frame_size
    offset, total, passed = 0, sum(map(len, chunks)), 0
    while offset < total:
        if offset + 4 > total:
            raise IntegrityError(
                where=h.where, message=f"record framing: record {len(records)} length cut short"
            )
        index, pos = divmod(offset, size)
        while passed < index:
            chunks[passed], passed = b"", passed + 1
        chunk = chunks[index]
        if pos + 4 <= len(chunk):
            (length,) = unpack(chunk, pos)
        else:
            length = int.from_bytes(_gather(chunks, size, offset, 4), "big")
        offset += 4
        if offset + length > total:
            why = "runs past the end of the record stream"
            raise IntegrityError(
                where=h.where, message=f"record framing: record {len(records)} {why}"
            )
        end = pos + 4 + length
        append(chunk[pos + 4 : end] if end <= len(chunk) else _gather(chunks, size, offset, length))
        offset += length
    return records
