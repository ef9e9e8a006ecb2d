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

import codecs
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
    """Hints from one S3 event-notification message (other messages, e.g. s3:TestEvent: none).

    Raises ``ValueError`` naming what is wrong when the message has the shape of none:
    ``Records`` not a list, a record, its ``s3``, ``bucket`` or ``object`` not an object.
    """
    records = message.get("Records") or []
    if not isinstance(records, list):
        raise ValueError("S3 event: Records is not a list")
    hints = []
    for item in records:
        rec = _object(item, "record")
        s3 = _object(rec.get("s3") or {}, "record's s3")
        obj = _object(s3.get("object") or {}, "record's s3.object")
        bucket = _object(s3.get("bucket") or {}, "record's s3.bucket")
        name = str(rec.get("eventName", ""))
        if "key" not in obj or not name.startswith(("ObjectCreated", "ObjectRemoved", "s3:Object")):
            continue
        hints.append(
            Hint(
                bucket=str(bucket.get("name", "")),
                key=unquote_plus(str(obj["key"])),
                time=_iso_time(rec.get("eventTime")),
                deleted="ObjectRemoved" in name,
                sequencer=str(obj.get("sequencer", "")),
            )
        )
    return hints


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"S3 event: {what} is not an object")
    return value


def _iso_time(text: Any) -> float:
    if not isinstance(text, str) or not text:
        return 0.0
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):  # not a time, or one out of range
        return 0.0


def filer_hints(event: dict[str, Any], buckets_dir: str = "/buckets") -> list[Hint]:
    """Hints from one filer metadata event: the old path (if it went away) and the new one.

    Raises ``ValueError`` naming what is wrong when the event does not have that shape
    (``tsNs`` not an integer, the notification or an entry not an object, an entry's
    name not a string).
    """
    note = event.get("eventNotification") or {}
    if not isinstance(note, dict):
        raise ValueError("filer event: eventNotification is not an object")
    directory = str(event.get("directory", ""))
    when = event_time(event)
    old, new = _entry(note.get("oldEntry"), "oldEntry"), _entry(note.get("newEntry"), "newEntry")
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


def event_time(event: dict[str, Any]) -> float:
    """A filer event's ``tsNs`` in unix seconds (0 when absent); ``ValueError`` if it is not
    a non-negative integer of at most 20 digits."""
    ts = event.get("tsNs", 0) or 0
    if isinstance(ts, str) and ts.isascii() and ts.isdigit() and len(ts) <= 20:
        ts = int(ts)
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts < 10**20:
        raise ValueError(f"filer event: tsNs {ts!r:.40} is not a time in nanoseconds")
    return ts / 1e9


def _entry(value: Any, what: str) -> dict[str, Any] | None:
    if not value:  # absent, null or empty: no entry
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ValueError(f"filer event: {what} is not an entry with a name")
    return value


def _filer_hint(directory: str, name: str, when: float, deleted: bool, root: str) -> Hint | None:
    path = f"{directory.rstrip('/')}/{name}"
    root = root.rstrip("/") + "/"
    if not path.startswith(root):
        return None
    bucket, _, key = path[len(root) :].partition("/")
    if not key or key.startswith(".uploads/") or bucket.startswith("."):
        return None
    return Hint(bucket=bucket, key=key, time=when, deleted=deleted)


MAX_EVENT = 16 << 20
"""Characters a JSON value may span before it is dropped unread (a filer event is a few
KiB; a huge file's chunk list some MiB)."""

# Truncating a valid value at its end can only fail these ways: inside a string, or
# within the last few characters (a literal such as ``-Infinit``, a number's exponent).
_CUT_SHORT = 8


class JsonStream:
    """Splits a byte stream of concatenated (possibly pretty-printed) JSON values.

    Bytes are decoded incrementally (a UTF-8 character split between two reads is kept
    whole). A value that can never parse is skipped, and so is one that grows beyond
    ``max_event`` characters: the stream goes on with the next ``{``, and ``dropped``
    counts what was skipped (those events are lost: the caller should scan).
    """

    def __init__(self, max_event: int = MAX_EVENT) -> None:
        self._buf = ""
        self._decoder = json.JSONDecoder()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.max_event = max_event
        self.dropped = 0

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        """Yield every complete JSON object fed so far; keep the partial tail."""
        self._buf += self._utf8.decode(data)
        pos = 0
        while True:
            start = self._buf.find("{", pos)
            if start < 0:
                self._buf = ""
                return
            try:
                value, end = self._decoder.raw_decode(self._buf, start)
            except RecursionError:  # nested too deeply to ever parse
                self.dropped += 1
                pos = start + 1
                continue
            except json.JSONDecodeError as exc:
                cut_short = exc.msg.startswith("Unterminated string") or (
                    exc.pos >= len(self._buf) - _CUT_SHORT
                )
                if not cut_short:  # a malformed value: skip it
                    self.dropped += 1
                    pos = start + 1
                    continue
                if len(self._buf) - start > self.max_event:  # too long to keep waiting for
                    self.dropped += 1
                    self._buf = ""
                    return
                self._buf = self._buf[start:]
                return
            pos = end
            if isinstance(value, dict):
                yield value
