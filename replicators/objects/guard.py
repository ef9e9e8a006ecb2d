"""The mass-delete decision: a sliding window of deletes against a share and a count.

Pure logic, no I/O (the mirror target feeds it and persists what it returns).

A delete about to be applied to the mirror *trips* the guard when, counting it,
the deletes applied within the last ``window`` seconds would exceed

- ``count``, or
- ``share`` of the mirror's keys (the base is the mirror's keys before the
  window's deletes: the keys it holds now plus the deletes applied in the
  window, so the base does not shrink as the deletes land),

except that fewer than ``min_deletes`` deletes in a window never trip it (a small
bucket's housekeeping is not a mass delete): the limit is
``min(count, max(min_deletes, floor(share * base)))``.

So at most the threshold's worth of deletes lands in a window; from the one that
would exceed it on, deletes are held until an operator decides.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class GuardPolicy:
    share: float = 0.05
    count: int = 10_000
    window: float = 600.0
    min_deletes: int = 100
    enabled: bool = True

    def limit(self, base: int) -> int:
        """Deletes allowed in one window over a mirror of ``base`` keys."""
        return min(self.count, max(self.min_deletes, math.floor(self.share * base)))


class DeleteWindow:
    """The deletes applied within the last ``policy.window`` seconds (time, key)."""

    def __init__(self, policy: GuardPolicy, entries: Iterable[tuple[float, str]] = ()) -> None:
        self.policy = policy
        self.entries: deque[tuple[float, str]] = deque(sorted(entries))

    def prune(self, now: float) -> None:
        horizon = now - self.policy.window
        while self.entries and self.entries[0][0] <= horizon:
            self.entries.popleft()

    def __len__(self) -> int:
        return len(self.entries)

    def trips(self, now: float, mirror_keys: int) -> str | None:
        """Would one more delete now exceed the policy? The reason if so, else None.

        ``mirror_keys``: the keys the mirror holds now (before this delete)."""
        if not self.policy.enabled:
            return None
        self.prune(now)
        recent = len(self.entries)
        base = mirror_keys + recent
        limit = self.policy.limit(base)
        if recent + 1 <= limit:
            return None
        p, minutes = self.policy, self.policy.window / 60
        if limit == p.count:
            why = f"the count {p.count}"
        else:
            why = f"{p.share:.1%} of the mirror's {base} keys (at least {p.min_deletes})"
        return f"{recent + 1} deletes within {minutes:g} min would exceed {limit}: {why}"

    def record(self, now: float, key: str) -> None:
        self.entries.append((now, key))

    def clear(self) -> None:
        self.entries.clear()

    def keys(self) -> list[str]:
        return [key for _, key in self.entries]
