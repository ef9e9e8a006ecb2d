"""Watermarks and the measured RPO of one stream: pure state, time passed in.

Positions are integers in the stream's own units (a WAL LSN, a record
counter) and ranges are half-open: a watermark at ``p`` means every change
before ``p`` has reached that stage.

RPO(now) is the data a disaster at ``now`` would lose, in seconds, and it is
never smaller than the truth we can prove. It is the larger of:

- ``now - proven_at``: ``proven_at`` is the latest wall time T for which we
  hold a *proof* that every change that existed at T is durable in the
  destination. Proofs come only while the stream runs (``live``): a shipper
  step that made everything it captured durable (``step_done``), or a head
  read independent of capture that lies within the durable position
  (``source_head``). A stream that fails, halts or never started gets no
  proof, so its RPO grows with wall time; before the first proof it counts
  from the checkpoint's last durable change (``resumed``), else from
  ``started_at``.
- ``now`` minus the source time from which the destination cannot restore
  (``source_floor``: a gap in its log that no base backup covers yet).
- ``now`` minus the source time of the oldest change known not to be durable
  (captured and in flight, or still inside the source). Measuring from the
  newest durable change instead would report hours for a stream that was idle
  for hours and then took one write; the loss window starts at the first
  change that would be lost.
"""

from __future__ import annotations

import time
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


Head = tuple[int, float]
"""(position, at): at wall time ``at`` every change at the source lay before ``position``."""


@dataclass
class StreamProgress:
    stream: str
    kind: str
    side: Literal["source", "sink", "job"]
    peer: str = ""
    marks: dict[Stage, Mark] = field(default_factory=dict)
    oldest_pending_time: float | None = None
    halted: str | None = None
    quarantined: dict[str, str] = field(default_factory=dict)
    """Segments refused as stale (key -> why): written under an epoch a newer one superseded."""
    source_pending: Callable[[], float | None] | None = None
    """Source time of the oldest change still inside the source (not yet batched)."""
    source_head: Callable[[], Head | None] | None = None
    """Optional: the source's head read independently of capture (see ``Head``)."""
    source_floor: Callable[[], float | None] | None = None
    """Optional: the source time from which the destination cannot restore, whatever
    reaches it later (a gap in its log that no base backup covers yet)."""
    live: bool = True
    """False while the stream's runner is not running (the supervising loop sets it):
    no proof is taken then."""
    started_at: float = field(default_factory=time.time)
    """Where the RPO counts from until the first proof (the one clock read of this module)."""
    proven_at: float | None = None
    """Latest wall time T at which every change that existed is proven durable; None: no
    proof yet."""

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
        """Everything before ``position`` is durable; ``next_time`` is the oldest still pending.

        This alone proves nothing about changes the stream has not seen: see ``step_done``."""
        self.advance("durable", position, source_time, now)
        self.oldest_pending_time = next_time

    def resumed(self, position: int, source_time: float | None, now: float) -> None:
        """The stream resumes at ``position``, durable since a previous run; ``source_time`` is
        that of its last durable change (None: a new stream). Not a proof: until one, the RPO
        counts from ``source_time`` (else from ``started_at``)."""
        self.advance("captured", position, source_time or now, now)
        self.advance("durable", position, source_time or now, now)
        self.oldest_pending_time = None
        if self.proven_at is None and source_time is not None:
            self.started_at = source_time

    def count_from(self, source_time: float | None) -> None:
        """Until a proof, the RPO counts from no later than ``source_time`` (the last change
        known durable, e.g. from a checkpoint read before the destination answered)."""
        if self.proven_at is None and source_time is not None:
            self.started_at = min(self.started_at, source_time)

    def step_done(self, began: float) -> None:
        """A shipper step that began at ``began`` returned normally with everything it captured
        durable: every change older than the oldest one the source still holds is durable, or,
        if it holds none, every change that existed at ``began``. Ignored while not live or
        while something captured is still pending."""
        if not self.live or self.pending():
            return
        held = self.source_pending() if self.source_pending is not None else None
        self.prove(began if held is None else held)

    def prove(self, at: float) -> None:
        """Every change that existed at ``at`` is durable (ignored while not live)."""
        if self.live and (self.proven_at is None or at > self.proven_at):
            self.proven_at = at

    def _prove_head(self) -> None:
        head = self.source_head() if self.source_head is not None and self.live else None
        durable = self.marks.get("durable")
        if head is not None and durable is not None and head[0] <= durable.position:
            self.prove(head[1])

    def _caught_up_at(self, position: int) -> bool:
        durable = self.marks.get("durable")
        return durable is not None and durable.position >= position

    def pending(self) -> bool:
        captured, durable = self.marks.get("captured"), self.marks.get("durable")
        if captured is None:
            return False
        return durable is None or durable.position < captured.position

    def rpo(self, now: float) -> float:
        """Seconds of changes a disaster at ``now`` could lose (see the module docstring).
        Takes the proof a head read gives first, so it may advance ``proven_at``."""
        self._prove_head()
        candidates = [self.started_at if self.proven_at is None else self.proven_at]
        if self.pending():
            candidates.append(self.oldest_pending_time)
        if self.source_pending is not None:
            candidates.append(self.source_pending())
        if self.source_floor is not None:
            candidates.append(self.source_floor())
        return max(0.0, now - min(t for t in candidates if t is not None))

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
        source = self.side == "source"
        out["rpo_seconds"] = self.rpo(now) if source else None
        out["proven_at"] = self.proven_at if source else None
        out["apply_lag_seconds"] = self.lag("applied", now) if self.side == "sink" else None
        out["halted"] = self.halted
        out["quarantined"] = dict(self.quarantined)
        return out
