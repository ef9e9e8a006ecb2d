"""The ``synthetic`` stream kind: records from a generator at a fixed rate.

It exists for tests, the demo and benchmarks. Record ``i`` is fully
determined by ``i`` (its body) and the time it was due, so a source that
resumes at ``i`` produces exactly the records a crashed one would have: the
vault must then hold every index exactly once, in order.

Record layout: ``>QdI`` (index, source time, body length) then the body.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from agent.config import SyntheticOptions
from replicators import checkpoint
from replicators.errors import IntegrityError
from replicators.segment import SegmentHeader
from replicators.stream import Applied, Change
from replicators.synthetic_verify import verify as verify  # the kind's on-demand check

if TYPE_CHECKING:
    from agent.config import AgentConfig, PeerConfig, StreamConfig
    from replicators.stream import Source, Target
from replicators.vault import SegmentRef

KIND = "synthetic"
_HEAD = struct.Struct(">QdI")
_LEN = struct.Struct(">I")


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


class SyntheticSource:
    """Generates record ``i`` at ``t0 + (i - first) / rate``; its source time is when it was due."""

    KIND: ClassVar[str] = KIND

    def __init__(self, options: SyntheticOptions) -> None:
        self.options = options
        self._next = 0
        self._first = 0
        self._returned = 0
        self._t0 = time.time()

    def pending_since(self) -> float | None:
        """Source time of the oldest due record not yet handed out in a batch."""
        due = self._due(self._returned)
        return due if due <= time.time() else None

    def _due(self, index: int) -> float:
        return self._t0 + (index - self._first) / self.options.rate

    async def resume(self, position: int) -> None:
        self._next = self._first = self._returned = position
        self._t0 = time.time()

    async def next_batch(self, max_bytes: int, max_age: float, stop: asyncio.Event) -> list[Change]:
        """All records already due (a backlog ships at once), then more until ``max_age``."""
        batch: list[Change] = []
        size = 0
        opts = self.options
        while not stop.is_set():
            now = time.time()
            while size < max_bytes and self._due(self._next) <= now:
                due = self._due(self._next)
                record = make_record(self._next, due, opts.record_size, opts.compressible)
                batch.append(Change(record, self._next, self._next + 1, due))
                self._next += 1
                size += len(record)
            if size >= max_bytes or (batch and now >= batch[0].source_time + max_age):
                break
            wake = self._due(self._next)
            if batch:
                wake = min(wake, batch[0].source_time + max_age)
            await _sleep_or_stop(wake - now, stop)
        self._returned = self._next
        return batch

    async def ack(self, position: int) -> None:
        """Nothing to release: the generator keeps no history."""

    async def aclose(self) -> None:
        pass


async def _sleep_or_stop(delay: float, stop: asyncio.Event) -> None:
    try:
        async with asyncio.timeout(max(0.0, delay)):
            await stop.wait()
    except TimeoutError:
        pass


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
            f.write(b"".join(_LEN.pack(len(r)) + r for r in records))
            f.flush()
            os.fsync(f.fileno())

    async def aclose(self) -> None:
        pass


def source(stream: StreamConfig, agent: AgentConfig, peer: PeerConfig, state_dir: Path) -> Source:
    return SyntheticSource(stream.synthetic)


def target(stream: StreamConfig, agent: AgentConfig, state_dir: Path) -> Target:
    return SyntheticTarget(state_dir)


def read_applied_log(path: Path) -> Iterator[bytes]:
    """Yield the records of a ``SyntheticTarget`` log, in order."""
    data = path.read_bytes() if path.exists() else b""
    offset = 0
    while offset < len(data):
        (length,) = _LEN.unpack_from(data, offset)
        offset += _LEN.size
        yield data[offset : offset + length]
        offset += length
