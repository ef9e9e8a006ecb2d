"""Watermarks and the measured RPO of one stream: pure state, time passed in.

Positions are integers in the stream's own units (a WAL LSN, a record
counter) and ranges are half-open: a watermark at ``p`` means every change
before ``p`` has reached that stage.

RPO(now) is the data a disaster at ``now`` would lose, in seconds: zero when
everything captured is durable in every destination, else ``now`` minus the
source time of the oldest change not yet durable. (Measuring from the newest
durable change instead would report hours for a stream that was idle for
hours and then took one write; the loss window starts at the first change
that would be lost.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Stage = Literal["captured", "durable", "applied", "verified"]
STAGES: tuple[Stage, ...] = ("captured", "durable", "applied", "verified")


@dataclass(frozen=True)
class Mark:
    """A watermark: a position, the source time of the change just before it, when reached."""

    position: int
    source_time: float
    reached_at: float


@dataclass
class StreamProgress:
    stream: str
    kind: str
    side: Literal["source", "sink", "job"]
    peer: str = ""
    marks: dict[Stage, Mark] = field(default_factory=dict)
    oldest_pending_time: float | None = None
    halted: str | None = None
    source_pending: Callable[[], float | None] | None = None
    """Source time of the oldest change still inside the source (not yet batched)."""

    def advance(self, stage: Stage, position: int, source_time: float, now: float) -> None:
        """Move a watermark forward; a position behind the current one is ignored."""
        current = self.marks.get(stage)
        if current is None or position >= current.position:
            self.marks[stage] = Mark(position, source_time, now)

    def capture(self, position: int, source_time: float, now: float, first_time: float) -> None:
        """Record newly captured changes; ``first_time`` is the oldest of them."""
        if self.oldest_pending_time is None and not self._caught_up_at(position):
            self.oldest_pending_time = first_time
        self.advance("captured", position, source_time, now)

    def durable(
        self, position: int, source_time: float, now: float, next_time: float | None
    ) -> None:
        """Everything before ``position`` is durable; ``next_time`` is the oldest still pending."""
        self.advance("durable", position, source_time, now)
        self.oldest_pending_time = next_time

    def _caught_up_at(self, position: int) -> bool:
        durable = self.marks.get("durable")
        return durable is not None and durable.position >= position

    def pending(self) -> bool:
        captured, durable = self.marks.get("captured"), self.marks.get("durable")
        if captured is None:
            return False
        return durable is None or durable.position < captured.position

    def rpo(self, now: float) -> float:
        candidates = [self.oldest_pending_time] if self.pending() else []
        if self.source_pending is not None:
            candidates.append(self.source_pending())
        known = [t for t in candidates if t is not None]
        return max(0.0, now - min(known)) if known else 0.0

    def lag(self, stage: Stage, now: float) -> float | None:
        """Seconds between now and the source time of the last change at ``stage``."""
        mark = self.marks.get(stage)
        return None if mark is None else max(0.0, now - mark.source_time)

    def snapshot(self, now: float) -> dict[str, object]:
        out: dict[str, object] = {
            "stream": self.stream,
            "kind": self.kind,
            "side": self.side,
            "peer": self.peer,
        }
        for stage in STAGES:
            mark = self.marks.get(stage)
            out[stage] = (
                None
                if mark is None
                else {
                    "position": mark.position,
                    "source_time": mark.source_time,
                    "reached_at": mark.reached_at,
                }
            )
        out["rpo_seconds"] = self.rpo(now) if self.side == "source" else None
        out["apply_lag_seconds"] = self.lag("applied", now) if self.side == "sink" else None
        out["halted"] = self.halted
        return out
