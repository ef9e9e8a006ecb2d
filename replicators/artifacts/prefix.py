"""The model store as an S3 prefix: ``<bucket>/<prefix><model>/<version>/<files>``.

A ``ModelStore`` (contract in ``modelstore``) for registries that write their
checkpoints to an object store (MLflow's S3 artifact store and the like).

- Listing: the whole prefix through ``S3Store.pages``, one page (≤ 1000
  keys) at a time. A key ``<model>/<version>/<path>`` is a file of that
  version when both names are valid and no part of the path is hidden
  (``.tmp/...``: where writers stage uploads) or empty (``dir/`` markers).
  S3 has no file modes: every file gets 0644. A file's time is its
  LastModified, so the quiet period counts from the newest object, and its
  ETag joins the version's fingerprint.
- Change detection: the periodic listing (``scan_interval``); there is no
  watch. A version is taken once its marker object exists, or once nothing
  in it changed for the quiet period, as in a directory tree.
- Reading: a file is read in ``RANGE``-byte ranges, each a GET with
  ``If-Match`` on the ETag it was listed with (``Bucket.read``, the ranged
  conditional read of the objects kind), the next range fetched while the
  chunker cuts the current one. Memory: two ranges per file being read. An
  object rewritten or deleted meanwhile raises ``Changed``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from datetime import datetime
from typing import Any, ClassVar

from replicators.artifacts.layout import FileInfo, VersionInfo
from replicators.artifacts.manifest import valid_name, valid_path
from replicators.artifacts.modelstore import Changed
from replicators.bucket import Bucket
from replicators.errors import AlreadyExists, NotFound, SourceError, StorageError
from replicators.settings import S3Config

KIND = "s3"
RANGE = 8 << 20
MODE = 0o644


def parse_key(key: str) -> tuple[str, str, str] | None:
    """``(model, version, path)`` of a key relative to the prefix, or None if it is not a
    file of a version (too short, an unsafe name, a hidden or empty component)."""
    model, _, rest = key.partition("/")
    version, _, path = rest.partition("/")
    if not (valid_name(model) and valid_name(version) and path and valid_path(path)):
        return None
    if any(part.startswith(".") for part in path.split("/")):
        return None
    return model, version, path


def _ns(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000) * 1000


class PrefixStore:
    """Open with ``await PrefixStore.open(cfg)`` (the bucket and prefix of ``cfg``)."""

    KIND: ClassVar[str] = KIND

    def __init__(self, bucket: Bucket, loop: asyncio.AbstractEventLoop) -> None:
        self.bucket = bucket
        self.loop = loop
        self.name = f"s3://{bucket.cfg.bucket}/{bucket.cfg.prefix}"

    @classmethod
    async def open(cls, cfg: S3Config) -> PrefixStore:
        return cls(await Bucket.open(cfg), asyncio.get_running_loop())

    async def scan(self) -> list[VersionInfo]:
        return await self._list("")

    async def scan_version(self, model: str, version: str) -> VersionInfo | None:
        found = await self._list(f"{model}/{version}/")
        return found[0] if found else None

    async def _list(self, under: str) -> list[VersionInfo]:
        files: dict[tuple[str, str], list[FileInfo]] = {}
        strip = len(self.bucket.cfg.prefix)
        try:
            async for page in self.bucket.pages(under):
                for item in page:
                    parsed = parse_key(item["Key"][strip:])
                    if parsed is None:
                        continue
                    model, version, path = parsed
                    etag = str(item.get("ETag", "")).strip('"')
                    info = FileInfo(path, int(item["Size"]), MODE, _ns(item["LastModified"]), etag)
                    files.setdefault((model, version), []).append(info)
        except StorageError as exc:
            raise SourceError(
                f"cannot list the model store {self.name}: {exc}",
                hint="check the [streams.artifacts.s3] endpoint, bucket and credentials",
            ) from None
        return [
            VersionInfo(model, version, tuple(sorted(fs, key=lambda f: f.path)), _newest(fs))
            for (model, version), fs in sorted(files.items())
        ]

    def reader(self, version: VersionInfo, file: FileInfo) -> RangeReader:
        key = f"{version.model}/{version.version}/{file.path}"
        return RangeReader(self.bucket, self.loop, key, file.size, file.etag)

    async def wait(self, delay: float, stop: asyncio.Event) -> None:
        """No watch: the periodic listing is the change detection."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)

    async def aclose(self) -> None:
        await self.bucket.aclose()


def _newest(files: list[FileInfo]) -> float:
    return max(f.mtime_ns for f in files) / 1e9


class RangeReader:
    """One object read in ranges from a worker thread, each range fetched on the event loop
    (``loop``) with ``If-Match`` on ``etag``. Not thread-safe: one reader, one thread."""

    def __init__(
        self, bucket: Bucket, loop: asyncio.AbstractEventLoop, key: str, size: int, etag: str
    ) -> None:
        self.bucket, self.loop, self.key, self.size, self.etag = bucket, loop, key, size, etag
        self._pos = 0  # where the next range to fetch starts
        self._buf = memoryview(b"")
        self._next: concurrent.futures.Future[bytes] | None = None

    def readinto(self, out: memoryview | bytearray) -> int:
        if not self._buf:
            if self._next is None and self._pos >= self.size:
                return 0
            self._buf = memoryview(self._take())
        n = min(len(out), len(self._buf))
        out[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def _take(self) -> bytes:
        """The range that starts at the current position; the next one is requested now."""
        start = self._pos
        future = self._next if self._next is not None else self._fetch(start)
        end = min(start + RANGE, self.size)
        self._pos = end
        self._next = self._fetch(end) if end < self.size else None
        try:
            data = future.result()
        except (AlreadyExists, NotFound):
            raise Changed(f"{self.key} changed while it was read") from None
        except StorageError as exc:
            raise OSError(f"{self.key}: {exc}") from None
        if len(data) != end - start:
            raise Changed(f"{self.key} changed while it was read")
        return data

    def _fetch(self, start: int) -> concurrent.futures.Future[bytes]:
        end = min(start + RANGE, self.size)
        read: Any = self.bucket.read(self.key, self.etag, start, end)
        return asyncio.run_coroutine_threadsafe(read, self.loop)

    def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
            self._next = None
        self._buf = memoryview(b"")
