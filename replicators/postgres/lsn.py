"""Pure LSN and WAL-file-name arithmetic (PostgreSQL's default 16 MiB WAL segments).

An LSN is a byte position in the WAL, written ``X/Y`` (high and low 32 bits in
hex). WAL is stored in files of ``WAL_SEGMENT_SIZE`` bytes named
``TTTTTTTTXXXXXXXXYYYYYYYY``: timeline, then the segment number split into
"log" and "seg" parts (``0x100000000 // WAL_SEGMENT_SIZE`` segments per log).

Also the vault record of a WAL run (``pack_record``, ``pack_history``, ``pack_gap``)
and ``LsnClock``, the (LSN, wall time) samples that date the WAL.
"""

from __future__ import annotations

import bisect
import re
import struct

WAL_SEGMENT_SIZE = 16 * 1024 * 1024
SEGMENTS_PER_LOG = 0x1_0000_0000 // WAL_SEGMENT_SIZE

_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_WAL_FILE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})(\.partial)?$")
_HISTORY = re.compile(r"^([0-9A-F]{8})\.history$")


def parse_lsn(text: str) -> int:
    """``"0/16B3748"`` → 23803720. Raises ``ValueError`` on anything else."""
    match = _LSN.match(text.strip())
    if not match:
        raise ValueError(f"not an LSN: {text!r} (expected X/Y in hex)")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segment_start(lsn: int) -> int:
    """The LSN where the WAL file holding ``lsn`` begins."""
    return lsn - lsn % WAL_SEGMENT_SIZE


def next_boundary(lsn: int) -> int:
    """The first WAL-file boundary strictly after ``lsn``."""
    return segment_start(lsn) + WAL_SEGMENT_SIZE


def wal_file_name(timeline: int, lsn: int) -> str:
    """Name of the WAL file holding ``lsn`` on ``timeline``."""
    segno = lsn // WAL_SEGMENT_SIZE
    return f"{timeline:08X}{segno // SEGMENTS_PER_LOG:08X}{segno % SEGMENTS_PER_LOG:08X}"


def parse_wal_file_name(name: str) -> tuple[int, int]:
    """``wal_file_name`` reversed: (timeline, LSN of the file's first byte).

    Raises ``ValueError`` for names that are not WAL files (history files,
    backup labels).
    """
    match = _WAL_FILE.match(name)
    if not match:
        raise ValueError(f"not a WAL file name: {name!r}")
    tli, log, seg = (int(match.group(i), 16) for i in (1, 2, 3))
    if seg >= SEGMENTS_PER_LOG:
        raise ValueError(f"not a WAL file name: {name!r} (segment part out of range)")
    return tli, (log * SEGMENTS_PER_LOG + seg) * WAL_SEGMENT_SIZE


def is_history_file(name: str) -> bool:
    return _HISTORY.match(name) is not None


def split_at_boundaries(start: int, data: bytes) -> list[tuple[int, bytes]]:
    """Cut a WAL byte run starting at ``start`` into pieces that do not cross a WAL file."""
    pieces = []
    offset = 0
    while offset < len(data):
        lsn = start + offset
        take = min(len(data) - offset, next_boundary(lsn) - lsn)
        pieces.append((lsn, data[offset : offset + take]))
        offset += take
    return pieces


_RECORD_HEAD = struct.Struct(">IQ")
MAX_CLOCK_SAMPLES = 10_000
HISTORY = 0xFFFF_FFFF_FFFF_FFFF
"""The start LSN that marks a record as a timeline history file, not WAL bytes."""


GAP = 0xFFFF_FFFF_FFFF_FFFE
"""The start LSN that marks a record as a gap: WAL ``[from, to)`` the vault never got."""
_GAP_BODY = struct.Struct(">QQ")


def pack_record(timeline: int, start: int, data: bytes) -> bytes:
    """A vault record: timeline, start LSN, then the WAL bytes (within one WAL file)."""
    return _RECORD_HEAD.pack(timeline, start) + data


def pack_history(timeline: int, content: bytes) -> bytes:
    """A vault record carrying timeline ``timeline``'s history file."""
    return _RECORD_HEAD.pack(timeline, HISTORY) + content


def pack_gap(timeline: int, start: int, end: int) -> bytes:
    """A vault record saying that WAL ``[start, end)`` is not in this log (a slot that no
    longer held it was re-seeded): the log goes on at ``end``, on ``timeline``."""
    return _RECORD_HEAD.pack(timeline, GAP) + _GAP_BODY.pack(start, end)


def is_gap(record: bytes) -> bool:
    """Whether ``record`` is a gap record (its head read, nothing copied)."""
    return len(record) >= _RECORD_HEAD.size and _RECORD_HEAD.unpack_from(record)[1] == GAP


def unpack_gap(data: bytes) -> tuple[int, int]:
    """The ``(start, end)`` of a gap record's body. Raises ``ValueError``."""
    if len(data) != _GAP_BODY.size:
        raise ValueError(f"gap record of {len(data)} bytes, expected {_GAP_BODY.size}")
    start, end = _GAP_BODY.unpack(data)
    if not start < end:
        raise ValueError(f"gap record from {format_lsn(start)} to {format_lsn(end)}")
    return start, end


def history_file_name(timeline: int) -> str:
    return f"{timeline:08X}.history"


def unpack_record(record: bytes) -> tuple[int, int, bytes]:
    """``pack_record`` / ``pack_history`` / ``pack_gap`` reversed (a history record has
    start ``HISTORY``, a gap ``GAP``). Raises ``ValueError`` on a record that cannot be WAL."""
    if len(record) < _RECORD_HEAD.size:
        raise ValueError("WAL record shorter than its header")
    timeline, start = _RECORD_HEAD.unpack_from(record)
    data = record[_RECORD_HEAD.size :]
    if start == HISTORY:
        if timeline < 2:
            raise ValueError(f"history record for timeline {timeline}")
        return timeline, start, data
    if start == GAP:
        if timeline == 0:
            raise ValueError("gap record with no timeline")
        unpack_gap(data)
        return timeline, start, data
    if timeline == 0 or (data and segment_start(start) != segment_start(start + len(data) - 1)):
        raise ValueError(f"WAL record at {format_lsn(start)} crosses a WAL file or has no timeline")
    return timeline, start, data


class LsnClock:
    """(LSN, wall time) samples: the time at which the primary's insert position was LSN.

    ``time_at(p)`` is the time of the newest sample at or before ``p``: a byte at
    ``p`` was written no earlier, so RPO figures derived from it err on the safe
    (larger) side by at most one sample interval.
    """

    def __init__(self) -> None:
        self._lsns: list[int] = []
        self._times: list[float] = []

    def add(self, lsn: int, at: float) -> None:
        if self._lsns and lsn < self._lsns[-1]:
            return
        self._lsns.append(lsn)
        self._times.append(at)
        if len(self._lsns) > MAX_CLOCK_SAMPLES:
            del self._lsns[: MAX_CLOCK_SAMPLES // 2], self._times[: MAX_CLOCK_SAMPLES // 2]

    def time_at(self, lsn: int) -> float | None:
        i = bisect.bisect_right(self._lsns, lsn)
        return self._times[i - 1] if i else None

    def newest(self) -> int | None:
        return self._lsns[-1] if self._lsns else None

    def latest(self) -> tuple[int, float] | None:
        """The newest sample: (insert LSN, wall time at which it was read)."""
        return (self._lsns[-1], self._times[-1]) if self._lsns else None

    def forget_before(self, lsn: int) -> None:
        """Drop samples no longer needed for positions at or after ``lsn``."""
        i = bisect.bisect_right(self._lsns, lsn) - 1
        if i > 0:
            del self._lsns[:i], self._times[:i]
