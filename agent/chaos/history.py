"""The chaos history: one JSON object per line (docs/chaos.md, "The history").

`History` appends events as they happen; `read_history` parses a finished (or
interrupted) run's file and refuses anything the checker could misread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

HISTORY_VERSION = 1


class History:
    """Appends one event per line to ``path``, flushed before `write` returns.

    The file is opened in append mode, so a history is never truncated. An
    event without ``"t"`` is stamped with ``clock()`` (wall-clock seconds). Not
    safe to share between threads; one writer per file.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._file: IO[str] = self.path.open("a", encoding="utf-8")

    def write(self, event: dict[str, Any]) -> dict[str, Any]:
        """Write ``event`` as one line and flush it; return it as written (with ``t``).

        Raises TypeError if the event is not JSON-serialisable (nothing is written).
        """
        stamped = event if "t" in event else {**event, "t": self._clock()}
        line = json.dumps(stamped, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()
        return stamped

    append = write  # the same operation, for callers that think of a log

    def close(self) -> None:
        """Close the file; idempotent."""
        self._file.close()

    def __enter__(self) -> History:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def parse_line(number: int, line: str) -> dict[str, Any]:
    """One history line as a dict; ValueError naming ``number`` if it is not an event."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"history line {number}: not JSON ({e.msg})") from None
    if not isinstance(event, dict):
        raise ValueError(f"history line {number}: not a JSON object")
    if not isinstance(event.get("type"), str):
        raise ValueError(f'history line {number}: no "type"')
    t = event.get("t")
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise ValueError(f'history line {number}: no numeric "t"')
    return event


def check_start(event: dict[str, Any]) -> None:
    """ValueError unless ``event`` is a `start` line of a version this code reads."""
    if event["type"] != "start":
        raise ValueError(f'history line 1: expected type "start", got {event["type"]!r}')
    if "version" not in event:
        raise ValueError('history line 1: the start line has no "version"')
    if event["version"] != HISTORY_VERSION:
        raise ValueError(
            f"history line 1: unknown version {event['version']!r} (this code reads "
            f"{HISTORY_VERSION})"
        )


def read_history(path: Path) -> list[dict[str, Any]]:
    """All events of the history at ``path``, in file order.

    Raises ValueError naming the line number for a line that is not a JSON
    object with a string ``type`` and a numeric ``t`` (blank lines included: a
    torn last line of a killed run is refused, not skipped), and for a first
    line that is not a `start` of version `HISTORY_VERSION`. An empty file is
    refused too. OSError if the file cannot be read.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"history {path}: empty")
    events = [parse_line(n, line) for n, line in enumerate(lines, start=1)]
    check_start(events[0])
    return events
