"""Crash-safe small state files (a stream's acknowledged or applied position).

``save`` writes a temporary file, fsyncs it, renames it over the old one and
fsyncs the directory: after a crash the file holds either the old or the new
state, never a mix. ``load`` returns ``None`` when there is no state yet.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from replicators.errors import IntegrityError


def save(path: Path, state: dict[str, Any], mode: int = 0o600) -> None:
    """Write ``state`` as JSON, crash-safe; the file gets ``mode`` (private by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(state, sort_keys=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked (a full disk, a signal)
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # not narrowed by the umask
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: Path) -> dict[str, Any] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        state = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"unreadable state file: {exc}", where=str(path)) from None
    if not isinstance(state, dict):
        raise IntegrityError("state file does not hold an object", where=str(path))
    return state
