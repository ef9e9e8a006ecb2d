"""The model store as a tree ``<root>/<model>/<version>/<files>``, and when a version is complete.

``FileInfo`` and ``VersionInfo`` describe a version wherever it is stored (a
directory here, an S3 prefix in ``prefix``). ``scan(root)`` lists every
version of a directory tree with its regular files (size, mode, mtime);
``complete(version, ...)`` says whether it may be shipped: its marker file
exists (when one is configured) or nothing in it changed for the quiet
period. Hidden entries (a leading ``.``) are skipped everywhere: they are
where writers (and the target) keep work in progress. Symlinks are not
followed. Synchronous (``os.scandir``); callers run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from replicators.artifacts.manifest import valid_name


@dataclass(frozen=True)
class FileInfo:
    path: str
    """Relative to the version directory, ``/``-separated."""
    size: int
    mode: int
    mtime_ns: int
    etag: str = ""
    """The object's ETag in an S3 store (empty in a directory)."""


@dataclass(frozen=True)
class VersionInfo:
    model: str
    version: str
    files: tuple[FileInfo, ...]
    newest: float
    """The newest modification time (unix seconds) of the directory and its files."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.model, self.version)

    @property
    def name(self) -> str:
        return f"{self.model}/{self.version}"

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def fingerprint(self) -> str:
        """Changes whenever a file is added, removed, resized, re-moded or rewritten (for an
        S3 store: also when an object's ETag changes)."""
        h = hashlib.sha256()
        for f in self.files:
            etag = f"\0{f.etag}" if f.etag else ""  # directory fingerprints predate etags
            h.update(f"{f.path}\0{f.size}\0{f.mode:o}\0{f.mtime_ns}{etag}\n".encode())
        return h.hexdigest()


def _walk(directory: Path, prefix: str, out: list[FileInfo]) -> float:
    newest = directory.stat().st_mtime
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            st = entry.stat(follow_symlinks=False)
            rel = f"{prefix}{entry.name}"
            if stat.S_ISDIR(st.st_mode):
                newest = max(newest, _walk(Path(entry.path), rel + "/", out))
            elif stat.S_ISREG(st.st_mode):
                out.append(FileInfo(rel, st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns))
                newest = max(newest, st.st_mtime_ns / 1e9)
    return newest


def scan_version(root: Path, model: str, version: str) -> VersionInfo | None:
    """One version, or None if its directory is gone."""
    directory = root / model / version
    files: list[FileInfo] = []
    try:
        newest = _walk(directory, "", files)
    except FileNotFoundError:
        return None
    return VersionInfo(model, version, tuple(files), newest)


def scan(root: Path) -> list[VersionInfo]:
    """Every version under ``root``, sorted by (model, version). Unsafe names are skipped."""
    out = []
    for model in _subdirs(root):
        for version in _subdirs(root / model):
            info = scan_version(root, model, version)
            if info is not None:
                out.append(info)
    return out


def _subdirs(path: Path) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return sorted(
                e.name for e in entries if e.is_dir(follow_symlinks=False) and valid_name(e.name)
            )
    except FileNotFoundError:
        return []


def complete(v: VersionInfo, now: float, marker: str | None, quiet: float) -> bool:
    """Ready to ship: the marker exists, or (no marker configured) quiet for ``quiet`` seconds."""
    if marker is not None:
        return any(f.path == marker for f in v.files)
    return bool(v.files) and now - v.newest >= quiet


def ready_at(v: VersionInfo, marker: str | None, quiet: float) -> float | None:
    """When ``v`` will be complete if nothing changes (None: only a marker will tell)."""
    return None if marker is not None else v.newest + quiet
