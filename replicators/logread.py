"""Reading a stream's log from the vault: the walk every restore uses.

``read_log`` yields the stream's segments in log order, each one fully
verified before it is yielded: authenticated and opened by ``unseal`` with
its name bound to its header (stream, epoch, seq: an old segment copied
under a new name is refused), continuous with the one before it (no gap or
overlap in seq or position: ``lineage.check_continuity``), and segments of
a superseded epoch left out (``lineage.stale``, named in ``LogWalk.stale``).

Errors: ``IntegrityError`` for a segment that fails any check (nothing after
it is yielded), the key provider's and the store's errors otherwise.
``check`` is the tolerant walk of ``dragent vault verify``: it names every
damaged segment instead of stopping at the first.

This is the one walk of a log: restores, drills, verification and the vault
commands read through it. (The sink reads incrementally, from where its target
stands, and quarantines what a newer epoch superseded: a streaming reader with
its own loop over the same checks.)
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from replicators import lineage
from replicators.errors import IntegrityError
from replicators.keys import KeyProvider, unseal
from replicators.segment import OpenedSegment
from replicators.stream import Applied
from replicators.vault import SegmentRef, Vault


@dataclass
class LogWalk:
    """One walk of a stream's log; ``stale`` holds the superseded segments left out."""

    vault: Vault
    keys: KeyProvider
    stream: str
    stale: list[SegmentRef] = field(default_factory=list)
    bytes: int = 0
    """Bytes of the segments fetched so far."""
    at: SegmentRef | None = None
    """The segment being read (after an ``IntegrityError``: the one that failed)."""

    async def refs(self) -> list[SegmentRef]:
        """The stream's segments that belong to its log, in order (names only)."""
        refs = [r async for r in self.vault.segments(self.stream)]
        self.stale = lineage.stale(refs)
        left_out = set(self.stale)
        return [r for r in refs if r not in left_out]

    async def open(self, ref: SegmentRef) -> OpenedSegment:
        """Fetch and open one segment, its name bound to its header."""
        self.at = ref
        return await self._fetch(ref)

    async def read(
        self,
        refs: Sequence[SegmentRef] | None = None,
        done: Callable[[int], None] = lambda n: None,
        *,
        prefetch: int = 1,
    ) -> AsyncIterator[tuple[SegmentRef, OpenedSegment]]:
        """Yield every segment of ``refs`` (default: the whole log) opened and checked for
        continuity with the one before; ``done(1)`` after each (a progress bar). Up to
        ``prefetch`` segments are fetched and opened ahead, in parallel; they are yielded
        in log order. Use it under ``contextlib.aclosing`` when leaving the loop early."""
        todo = iter(await self.refs() if refs is None else refs)
        ahead: deque[tuple[SegmentRef, asyncio.Task[OpenedSegment]]] = deque()
        last: Applied | None = None
        try:
            for ref in itertools.islice(todo, max(1, prefetch)):
                ahead.append((ref, asyncio.create_task(self._fetch(ref))))
            while ahead:
                ref, task = ahead.popleft()
                self.at = ref
                opened = await task
                if (nxt := next(todo, None)) is not None:
                    ahead.append((nxt, asyncio.create_task(self._fetch(nxt))))
                lineage.check_continuity(last, ref, opened.header)
                h = opened.header
                last = Applied(ref=ref, end=int(h.end), source_time=h.last_source_time)
                yield ref, opened
                done(1)
        finally:
            for _, task in ahead:
                task.cancel()

    async def check(self) -> AsyncIterator[Checked]:
        """Every segment of the log, each with what is wrong with it (None: nothing); the
        walk goes on past a damaged segment, so every damaged one is named (``dragent
        vault verify``). A segment that cannot be opened is not compared with the next."""
        last: Applied | None = None
        for ref in await self.refs():
            before = self.bytes
            try:
                opened = await self.open(ref)
            except IntegrityError as exc:
                last = None  # its end is unknown
                yield Checked(ref, None, self.bytes - before, str(exc))
                continue
            problem = None
            try:
                lineage.check_continuity(last, ref, opened.header)
            except IntegrityError as exc:
                problem = str(exc)
            h = opened.header
            last = Applied(ref=ref, end=int(h.end), source_time=h.last_source_time)
            yield Checked(ref, opened, self.bytes - before, problem)

    async def _fetch(self, ref: SegmentRef) -> OpenedSegment:
        """``open`` without moving ``at`` (a segment fetched ahead is not yet the one read)."""
        blob = await self.vault.get_segment(ref)
        self.bytes += len(blob)
        return await unseal(
            blob, self.keys, expect_stream=ref.stream, expect_epoch=ref.epoch, expect_seq=ref.seq
        )


@dataclass(frozen=True)
class Checked:
    """One segment of a tolerant walk (``LogWalk.check``)."""

    ref: SegmentRef
    opened: OpenedSegment | None
    size: int
    problem: str | None
