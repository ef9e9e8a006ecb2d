"""The WAL spool: WAL files rebuilt from verified vault segments (the postgres ``Target``).

Layout of a spool directory (readable by the PostgreSQL OS user, who runs
``wal-fetch`` as the standby's restore_command):

- ``<WAL file name>``: one 16 MiB file per WAL file, named as PostgreSQL names
  it (timeline-aware), preallocated; bytes are written at their LSN's offset.
- ``<TLI>.history``: a timeline's history file, shipped by a source that
  streams from a server on a timeline after 1 (a promoted standby).
- ``state.json``: the last applied segment, the applied end LSN and timeline.
  ``wal-fetch`` serves bytes only below that end, so bytes written by an apply
  that crashed before recording its state are never served. ``gap``: the last
  gap record applied (WAL the vault never received, after the source's slot was
  re-seeded); a standby fed from the spool cannot replay across it and must be
  re-seeded from a base backup taken after it.

``apply`` is idempotent: re-writing the same verified bytes at the same
offsets gives the same files. Every file written is fsynced before the state
that covers it is recorded.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from replicators import checkpoint
from replicators.errors import IntegrityError
from replicators.postgres import lsn as L
from replicators.segment import SegmentHeader
from replicators.stream import Applied
from replicators.vault import SegmentRef

KIND = "postgres"
STATE_FILE = "state.json"


def save_state(path: Path, state: dict[str, object]) -> None:
    """Crash-safe write (``checkpoint.save``), readable by the spool's group (wal-fetch)."""
    checkpoint.save(path, state, mode=0o640)


def load_state(spool: Path) -> dict[str, object] | None:
    try:
        return json.loads((spool / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise IntegrityError(f"unreadable spool state: {exc}", where=str(spool)) from exc


def decode_records(header: SegmentHeader, records: Sequence[bytes]) -> list[tuple[int, int, bytes]]:
    """Unpack and check a segment's WAL records: contiguous from ``header.start`` to
    ``header.end``. Raises ``IntegrityError`` otherwise (nothing of it may be applied)."""
    out = []
    expect = int(header.start)
    for record in records:
        try:
            timeline, start, data = L.unpack_record(record)
        except ValueError as exc:
            raise IntegrityError(str(exc), where=f"segment {header.seq}") from exc
        if start == L.HISTORY:
            out.append((timeline, start, data))
            continue
        if start == L.GAP:
            begin, end = L.unpack_gap(data)
            if begin != expect:
                raise IntegrityError(
                    f"gap record from {L.format_lsn(begin)}, expected {L.format_lsn(expect)}",
                    where=f"segment {header.seq}",
                )
            out.append((timeline, start, data))
            expect = end
            continue
        if start != expect:
            raise IntegrityError(
                f"WAL record starts at {L.format_lsn(start)}, expected {L.format_lsn(expect)}",
                where=f"segment {header.seq}",
            )
        out.append((timeline, start, data))
        expect = start + len(data)
    if expect != int(header.end):
        raise IntegrityError(
            f"WAL records end at {L.format_lsn(expect)}, header says {header.end}",
            where=f"segment {header.seq}",
        )
    return out


class WalSpool:
    """The ``Target`` of a postgres stream: a spool of WAL files under ``directory``."""

    KIND: ClassVar[str] = KIND

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        if not directory.exists():  # shared with the database later (share_with_database)
            directory.mkdir(parents=True)
            directory.chmod(0o2770)

    async def state(self) -> Applied | None:
        state = load_state(self.directory)
        if state is None:
            return None
        ref = SegmentRef(epoch=state["epoch"], seq=state["seq"], stream=state["stream"])  # type: ignore[arg-type]
        return Applied(ref=ref, end=int(state["end"]), source_time=float(state["source_time"]))  # type: ignore[arg-type]

    async def apply(self, ref: SegmentRef, header: SegmentHeader, records: Sequence[bytes]) -> None:
        """Write the segment's WAL bytes into their files, fsync, then record the state."""
        pieces = decode_records(header, records)
        wal = [p for p in pieces if p[1] != L.HISTORY]
        before = load_state(self.directory) or {}
        timeline = max([p[0] for p in wal], default=int(before.get("timeline", 1)))  # type: ignore[call-overload]
        await asyncio.to_thread(self._write, [p for p in pieces if p[1] != L.GAP])
        state = {
            "stream": ref.stream,
            "epoch": ref.epoch,
            "seq": ref.seq,
            "end": int(header.end),
            "timeline": timeline,
            "source_time": header.last_source_time,
        }
        gaps = [L.unpack_gap(p[2]) for p in pieces if p[1] == L.GAP]
        if gaps:  # a standby fed from this spool cannot replay across it: re-seed it
            state["gap"] = {"from": gaps[-1][0], "to": gaps[-1][1], "seq": ref.seq}
        elif "gap" in before:
            state["gap"] = before["gap"]
        await asyncio.to_thread(save_state, self.directory / STATE_FILE, state)

    def _seed_switch_file(self, fd: int, timeline: int, start: int) -> None:
        """A new timeline's first WAL file starts at its switch point: like PostgreSQL at
        a promotion, begin it with the older timeline's file of the same segment, so
        a standby that switched timelines reads the bytes before the switch point
        (a promoted primary of another region ships only from there)."""
        for older in range(timeline - 1, 0, -1):
            path = self.directory / L.wal_file_name(older, start)
            if path.exists():
                with path.open("rb") as f:
                    os.pwrite(fd, f.read(L.WAL_SEGMENT_SIZE), 0)
                return

    def _write(self, pieces: list[tuple[int, int, bytes]]) -> None:
        touched: dict[Path, int] = {}
        try:
            for timeline, start, data in pieces:
                if start == L.HISTORY:
                    path = self.directory / L.history_file_name(timeline)
                    fd = touched.get(path) or os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
                    touched[path] = fd
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, data, 0)
                    continue
                path = self.directory / L.wal_file_name(timeline, start)
                fd = touched.get(path)
                if fd is None:
                    fresh = not path.exists()
                    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
                    touched[path] = fd
                    if os.fstat(fd).st_size < L.WAL_SEGMENT_SIZE:
                        os.ftruncate(fd, L.WAL_SEGMENT_SIZE)
                    if fresh:
                        self._seed_switch_file(fd, timeline, start)
                os.pwrite(fd, data, start % L.WAL_SEGMENT_SIZE)
            for fd in touched.values():
                os.fsync(fd)
        finally:
            for fd in touched.values():
                os.close(fd)
        if touched:
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    async def aclose(self) -> None:
        pass
