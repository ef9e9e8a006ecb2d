"""Change notifications, parsed into ``Hint``s (pure).

Two shapes are understood:

- S3 event notifications (AWS S3, MinIO): ``{"Records": [{"eventName":
  "ObjectCreated:Put", "eventTime": "...", "s3": {"bucket": {"name": B},
  "object": {"key": URL-ENCODED, "sequencer": HEX}}}]}``, as delivered to a
  webhook or an SQS-compatible queue.
- SeaweedFS filer metadata events, as printed by ``weed filer.meta.tail``:
  ``{"directory": D, "eventNotification": {"oldEntry": ..., "newEntry": ...,
  "newParentPath": P}, "tsNs": T}``.

A hint only says "this key changed around this time": the capture then reads
the key's current state, so duplicates and out-of-order hints are harmless.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus


@dataclass(frozen=True, slots=True)
class Hint:
    bucket: str
    key: str
    time: float
    deleted: bool
    sequencer: str = ""


def s3_event_hints(message: dict[str, Any]) -> list[Hint]:
    """Hints from one S3 event-notification message (other messages, e.g. s3:TestEvent: none)."""
    hints = []
    for rec in message.get("Records", []) or []:
        name = str(rec.get("eventName", ""))
        s3 = rec.get("s3") or {}
        obj = s3.get("object") or {}
        if "key" not in obj or not name.startswith(("ObjectCreated", "ObjectRemoved", "s3:Object")):
            continue
        when = _iso_time(rec.get("eventTime"))
        hints.append(
            Hint(
                bucket=str((s3.get("bucket") or {}).get("name", "")),
                key=unquote_plus(str(obj["key"])),
                time=when,
                deleted="ObjectRemoved" in name,
                sequencer=str(obj.get("sequencer", "")),
            )
        )
    return hints


def _iso_time(text: Any) -> float:
    if not isinstance(text, str) or not text:
        return 0.0
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def filer_hints(event: dict[str, Any], buckets_dir: str = "/buckets") -> list[Hint]:
    """Hints from one filer metadata event: the old path (if it went away) and the new one."""
    note = event.get("eventNotification") or {}
    directory = str(event.get("directory", ""))
    when = int(event.get("tsNs", 0) or 0) / 1e9
    old, new = note.get("oldEntry"), note.get("newEntry")
    hints = []
    if old and not old.get("isDirectory"):
        moved = new is not None and (
            new.get("name") != old.get("name")
            or (note.get("newParentPath") or directory) != directory
        )
        if new is None or moved:
            hint = _filer_hint(directory, old["name"], when, True, buckets_dir)
            hints += [hint] if hint else []
    if new and not new.get("isDirectory"):
        parent = str(note.get("newParentPath") or directory)
        hint = _filer_hint(parent, new["name"], when, False, buckets_dir)
        hints += [hint] if hint else []
    return hints


def _filer_hint(directory: str, name: str, when: float, deleted: bool, root: str) -> Hint | None:
    path = f"{directory.rstrip('/')}/{name}"
    root = root.rstrip("/") + "/"
    if not path.startswith(root):
        return None
    bucket, _, key = path[len(root) :].partition("/")
    if not key or key.startswith(".uploads/") or bucket.startswith("."):
        return None
    return Hint(bucket=bucket, key=key, time=when, deleted=deleted)


class JsonStream:
    """Splits a byte stream of concatenated (possibly pretty-printed) JSON values."""

    def __init__(self) -> None:
        self._buf = ""
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        """Yield every complete JSON object fed so far; keep the partial tail."""
        self._buf += data.decode("utf-8", errors="replace")
        pos = 0
        while True:
            start = self._buf.find("{", pos)
            if start < 0:
                self._buf = ""
                return
            try:
                value, end = self._decoder.raw_decode(self._buf, start)
            except json.JSONDecodeError:
                self._buf = self._buf[start:]
                return
            pos = end
            if isinstance(value, dict):
                yield value
