"""One queue of keys to capture, fed by events and the scan, de-duplicated by key.

A key is queued once however many events or scan hits name it: capture
always reads the key's current state, so one capture covers every change
queued before it. A key being captured (a large object in flight) is
``held``: changes to it wait until the capture ends, so one key is never
captured twice at once and its records stay in source order.

``accept`` (optional) limits the queue to some keys (a partition of the key
space): a key it refuses is never queued, so no record of it is ever made.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class ChangeQueue:
    def __init__(self, accept: Callable[[str], bool] | None = None) -> None:
        self._keys: OrderedDict[str, float] = OrderedDict()
        self._held: dict[str, float] = {}
        self.accept = accept

    def add(self, key: str, since: float) -> None:
        """Queue ``key``, changed at ``since`` (keeps the oldest time if already queued);
        a key ``accept`` refuses is ignored."""
        if self.accept is not None and not self.accept(key):
            return
        if key in self._held:
            self._held[key] = min(self._held[key], since) if self._held[key] else since
            return
        old = self._keys.get(key)
        if old is None or since < old:
            self._keys[key] = since

    def pop(self) -> tuple[str, float] | None:
        """The oldest queued key that is not held, and when it changed."""
        for key in self._keys:
            return key, self._keys.pop(key)
        return None

    def hold(self, key: str) -> None:
        self._held[key] = 0.0

    def release(self, key: str) -> None:
        """End a capture; a change that arrived meanwhile is queued again."""
        since = self._held.pop(key, 0.0)
        if since:
            self.add(key, since)

    def oldest(self) -> float | None:
        times = [t for t in self._keys.values()] + [t for t in self._held.values() if t]
        return min(times) if times else None

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys
