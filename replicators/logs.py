"""Structured logs: one event a line, JSON or logfmt, constant messages with fields.

``RateLimited`` keeps a repeating error to one line per interval, with the
count of those it held back.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at the moment of writing (it may be replaced after start)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(fmt: str = "json", level: str = "info") -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.processors.LogfmtRenderer(key_order=["ts", "level", "event"])
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )


def get(name: str, **fields: Any) -> Any:
    return structlog.get_logger().bind(logger=name, **fields)


class RateLimited:
    """Let one event per ``interval`` seconds through for each key."""

    def __init__(self, interval: float = 30.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str, now: float | None = None) -> int | None:
        """Return the number held back since the last allowed event, or None to hold this one."""
        now = time.monotonic() if now is None else now
        if now - self._last.get(key, -1e18) >= self.interval:
            self._last[key] = now
            return self._held.pop(key, 0)
        self._held[key] = self._held.get(key, 0) + 1
        return None

    def forget(self, key: str) -> bool:
        """Reset a key; True if it had been reporting (for a 'recovered' line)."""
        self._held.pop(key, None)
        return self._last.pop(key, None) is not None
