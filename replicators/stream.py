"""The two interfaces every stream kind implements: a ``Source`` and a ``Target``.

Positions are integers in the kind's own units and ranges are half-open: a
change covers ``[start, end)`` and the next change starts at its ``end``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from replicators.segment import SegmentHeader
from replicators.vault import SegmentRef


@dataclass(frozen=True, slots=True)
class Change:
    """One captured change: its bytes, its range, and when it happened at the source."""

    payload: bytes
    start: int
    end: int
    source_time: float


class Source(Protocol):
    """Captures changes in the active region.

    - ``resume(position)`` is called once before any batch: the next change
      returned starts at ``position`` (everything before it is durable).
    - ``next_batch`` returns changes in order, contiguous with the previous
      batch; it returns as soon as ``max_bytes`` are gathered, ``max_age``
      seconds after the first change of the batch, or when ``stop`` is set
      (then with what it has, possibly nothing). It may raise ``SourceError``.
    - ``ack(position)`` tells the source that everything before ``position``
      is durable in every destination; the source may then release it.
    - ``pending_since()`` is the source time of the oldest change the source
      has seen but not yet returned in a batch, or ``None``; it feeds the RPO.
    - Optional ``head()``: ``(position, at)`` when the source can say that at
      wall time ``at`` every change it can know of lay before ``position``
      (read independently of any batch, e.g. a scan or listing that found
      nothing new), else ``None``; it must never offer a fresh ``at`` while
      its capture is failing. It proves an idle stream's RPO
      (``replicators.progress.Head``).
    - Optional ``note_durable_time(t)``, called before ``resume``: the source time
      of the last change durable at the position given.
    - Optional ``unrestorable_since()``: the source time from which the
      destination cannot restore, whatever reaches it later (a gap in the log
      no base backup covers yet), else ``None``; it feeds the RPO.
    """

    KIND: ClassVar[str]

    async def resume(self, position: int) -> None: ...

    async def next_batch(
        self, max_bytes: int, max_age: float, stop: asyncio.Event
    ) -> list[Change]: ...

    async def ack(self, position: int) -> None: ...

    def pending_since(self) -> float | None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Applied:
    """Where a target stands: the last segment applied and the position it ended at."""

    ref: SegmentRef
    end: int
    source_time: float


class Target(Protocol):
    """The ready-to-serve copy in a passive region.

    - ``state()`` returns the last applied segment, or ``None`` for a new target.
    - ``apply`` applies one verified segment's records; it is idempotent (a
      crash between applying and recording leaves a state from which the
      same segment can be applied again with the same result) and records the
      new state durably before returning.
    """

    KIND: ClassVar[str]

    async def state(self) -> Applied | None: ...

    async def apply(
        self, ref: SegmentRef, header: SegmentHeader, records: Sequence[bytes]
    ) -> None: ...

    async def aclose(self) -> None: ...
