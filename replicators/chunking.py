"""Content-defined chunking (FastCDC) and chunk ids (SHA-256), for any stream kind.

Data is cut with FastCDC (``pyfastcdc``, the 2020 algorithm) so that an edit
moves chunk boundaries only near the edit: everything before and after it is
cut exactly as before and gives the same chunks. A chunk's id is the SHA-256
of its bytes. Synchronous; streams are read in pieces, so memory stays
bounded by the chunks being hashed.

Two ways in: ``cut_stream`` (a reader with ``readinto``) and ``Cutter``, fed
blocks as they arrive (an asyncio pipe, say) and giving the same chunks as one
``cut_stream`` over their concatenation. Each kind picks its own sizes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pyfastcdc import FastCDC

ID_SIZE = 32
HASH_NAME = "sha256"


def chunk_id(data: bytes | memoryview) -> bytes:
    """The 32-byte id of a chunk: SHA-256 of its bytes."""
    return hashlib.sha256(data).digest()


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk: where it is in what was cut, its id and its bytes."""

    offset: int
    length: int
    id: bytes
    data: bytes


class Readable(Protocol):
    def readinto(self, buffer: memoryview) -> int: ...


class Chunker:
    """Cuts data into chunks of ``min_size``..``max_size`` bytes, ``avg_size`` on average.

    The same parameters must be used for everything meant to share chunks; ``params``
    names them (recorded in manifests).
    """

    def __init__(self, min_size: int, avg_size: int, max_size: int) -> None:
        self.min_size, self.avg_size, self.max_size = min_size, avg_size, max_size
        self._cdc = FastCDC(avg_size, min_size=min_size, max_size=max_size)

    @property
    def params(self) -> str:
        return f"fastcdc2020/{self.min_size}/{self.avg_size}/{self.max_size}/{HASH_NAME}"

    def cut_file(self, path: Path) -> Iterator[Piece]:
        """Yield the chunks of ``path`` in order, each with its own copy of the bytes. An
        empty file yields nothing. The file is read, not memory-mapped: a file truncated
        while it is read gives short data (caught by the caller's re-scan), never SIGBUS.

        Raises ``OSError`` when the file cannot be read.
        """
        with open(path, "rb", buffering=0) as f:
            yield from self.cut_stream(f)

    def cut_stream(self, reader: Readable) -> Iterator[Piece]:
        """Yield the chunks of what ``reader`` holds, in order; its errors propagate."""
        for c in self._cdc.cut_stream(reader):
            data = bytes(c.data)  # the stream's buffer is reused for the next chunk
            yield Piece(c.offset, c.length, chunk_id(data), data)

    def cut_bytes(self, data: bytes) -> Iterator[Piece]:
        for c in self._cdc.cut_buf(data):
            piece = bytes(c.data)
            yield Piece(c.offset, c.length, chunk_id(piece), piece)

    def cutter(self) -> Cutter:
        return Cutter(self)


class Cutter:
    """Incremental cutting: ``feed`` blocks, then ``finish``; together they yield the
    chunks ``cut_stream`` would over the blocks' concatenation (offsets included).

    FastCDC finds each cut from the chunk's start only, so the last chunk of what has
    been fed (it may be cut short by the end of the data so far) is held back and cut
    again with the next block; at most ``max_size`` bytes are held.
    """

    def __init__(self, chunker: Chunker) -> None:
        self._chunker = chunker
        self._held = b""
        self._offset = 0  # where ``_held`` starts in the whole

    def feed(self, block: bytes) -> list[Piece]:
        data = self._held + block if self._held else block
        out = []
        pieces = list(self._chunker._cdc.cut_buf(data))
        for c in pieces[:-1]:
            piece = bytes(c.data)
            out.append(Piece(self._offset + c.offset, c.length, chunk_id(piece), piece))
        last = pieces[-1] if pieces else None
        start = last.offset if last is not None else 0
        self._offset += start
        self._held = data[start:]
        return out

    def finish(self) -> list[Piece]:
        if not self._held:
            return []
        data, self._held = self._held, b""
        out = [
            Piece(self._offset + c.offset, c.length, chunk_id(bytes(c.data)), bytes(c.data))
            for c in self._chunker._cdc.cut_buf(data)
        ]
        self._offset += len(data)
        return out
