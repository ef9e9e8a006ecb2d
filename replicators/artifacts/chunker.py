"""Content-defined chunking (FastCDC) and chunk ids (SHA-256).

A file is cut with FastCDC (``pyfastcdc``, the 2020 algorithm) so that an edit
moves chunk boundaries only near the edit: a new checkpoint that changes some
tensors shares every other chunk with the last one. A chunk's id is the
SHA-256 of its bytes (docs/artifacts.md, "Chunk ids", gives the collision
argument). Synchronous; reads the file as a stream (pyfastcdc's
``cut_stream``), so memory stays bounded by the chunks being hashed.
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
    """One chunk of a file: where it is, its id and its bytes."""

    offset: int
    length: int
    id: bytes
    data: bytes


class Readable(Protocol):
    def readinto(self, buffer: memoryview) -> int: ...


class Chunker:
    """Cuts files into chunks of ``min_size``..``max_size`` bytes, ``avg_size`` on average.

    The same parameters must be used for every version of a store, or no chunk
    would be shared; they are recorded in every manifest.
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
