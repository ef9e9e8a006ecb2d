"""Capped exponential backoff with full jitter: pure, the random draw passed in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Backoff:
    base: float = 0.2
    cap: float = 30.0
    attempt: int = 0

    def next_delay(self, draw: float) -> float:
        """Delay before the next try; ``draw`` is uniform in [0, 1). Counts the attempt."""
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 62)
        return ceiling * draw

    def reset(self) -> None:
        self.attempt = 0
