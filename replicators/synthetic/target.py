"""The passive side: an append-only log of the applied records."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from replicators import checkpoint
from replicators.segment import SegmentHeader
from replicators.stream import Applied
from replicators.synthetic.records import KIND, LENGTH
from replicators.vault import SegmentRef


class SyntheticTarget:
    """Appends applied records to ``applied.log`` (length-prefixed) under ``directory``.

    The state file records the log's length with the segment, so after a crash
    the log is cut back to the last recorded state and the segment re-applied.
    """

    KIND: ClassVar[str] = KIND

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.log_path = directory / "applied.log"
        self.state_path = directory / "applied.json"
        directory.mkdir(parents=True, exist_ok=True)

    async def state(self) -> Applied | None:
        state = checkpoint.load(self.state_path)
        self._truncate(int(state["log_size"]) if state else 0)
        if state is None:
            return None
        ref = SegmentRef(epoch=state["epoch"], seq=state["seq"], stream=state["stream"])
        return Applied(ref=ref, end=state["end"], source_time=state["source_time"])

    def _truncate(self, size: int) -> None:
        with open(self.log_path, "ab") as f:
            if f.tell() > size:
                f.truncate(size)
                os.fsync(f.fileno())

    async def apply(self, ref: SegmentRef, header: SegmentHeader, records: Sequence[bytes]) -> None:
        await asyncio.to_thread(self._append, records)
        size = self.log_path.stat().st_size
        state = {
            "stream": ref.stream,
            "epoch": ref.epoch,
            "seq": ref.seq,
            "end": int(header.end),
            "source_time": header.last_source_time,
            "log_size": size,
        }
        await asyncio.to_thread(checkpoint.save, self.state_path, state)

    def _append(self, records: Sequence[bytes]) -> None:
        with open(self.log_path, "ab") as f:
            f.write(b"".join(LENGTH.pack(len(r)) + r for r in records))
            f.flush()
            os.fsync(f.fileno())

    async def aclose(self) -> None:
        pass
