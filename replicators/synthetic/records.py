"""The synthetic record: ``>QdI`` (index, source time, body length) then the body; and the
applied log a target keeps (each record length-prefixed, ``>I``)."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from pathlib import Path

from replicators.errors import IntegrityError

KIND = "synthetic"
_HEAD = struct.Struct(">QdI")
LENGTH = struct.Struct(">I")


def make_record(index: int, source_time: float, size: int, compressible: bool) -> bytes:
    body_len = max(0, size - _HEAD.size)
    if compressible:
        line = f"INSERT INTO runs VALUES ({index}, 'experiment-{index % 97}', 0.{index:08d});\n"
        body = (line.encode() * (body_len // len(line) + 1))[:body_len]
    else:
        body = random.Random(index).randbytes(body_len)
    return _HEAD.pack(index, source_time, body_len) + body


def parse_record(record: bytes) -> tuple[int, float, bytes]:
    """Return (index, source time, body); raises ``IntegrityError`` on a malformed record."""
    if len(record) < _HEAD.size:
        raise IntegrityError("synthetic record shorter than its header")
    index, source_time, body_len = _HEAD.unpack_from(record)
    if len(record) != _HEAD.size + body_len:
        raise IntegrityError(f"synthetic record {index}: length mismatch")
    return index, source_time, record[_HEAD.size :]


def read_applied_log(path: Path) -> Iterator[bytes]:
    """Yield the records of a ``SyntheticTarget`` log, in order."""
    data = path.read_bytes() if path.exists() else b""
    offset = 0
    while offset < len(data):
        (length,) = LENGTH.unpack_from(data, offset)
        offset += LENGTH.size
        yield data[offset : offset + length]
        offset += length
