"""A vault on local disk, for the artifacts benchmark's extra row only.

The agent's vault is always S3 (``replicators.s3``); this ``ObjectStore``
exists so the benchmark can also show dragent's pipeline writing to the same
kind of storage restic writes its local repository to. Like restic's local
backend it writes each object to a temporary file, fsyncs it, moves it into
place (a hard link when ``if_absent``, so an existing object is never
replaced) and fsyncs the directory.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import ClassVar

from replicators.errors import AlreadyExists, NotFound
from replicators.store import ObjectInfo


class DirStore:
    KIND: ClassVar[str] = "dir"

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        await asyncio.to_thread(self._put, key, data, if_absent)

    def _put(self, key: str, data: bytes, if_absent: bool) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            if if_absent:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise AlreadyExists("object exists", key=key) from None
            else:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread((self.root / key).read_bytes)
        except FileNotFoundError:
            raise NotFound("no such object", key=key) from None

    async def stat(self, key: str) -> ObjectInfo:
        try:
            return ObjectInfo(key=key, size=(self.root / key).stat().st_size)
        except FileNotFoundError:
            raise NotFound("no such object", key=key) from None

    async def list(
        self, prefix: str, *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        for key, size in await asyncio.to_thread(self._keys, prefix):
            if start_after is None or key > start_after:
                yield ObjectInfo(key=key, size=size)

    def _keys(self, prefix: str) -> list[tuple[str, int]]:
        top = self.root / prefix.rpartition("/")[0]
        out = []
        for directory, _, names in os.walk(top):
            for name in names:
                path = Path(directory) / name
                key = path.relative_to(self.root).as_posix()
                if not name.startswith(".") and key.startswith(prefix):
                    out.append((key, path.stat().st_size))
        return sorted(out)

    async def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    async def aclose(self) -> None:
        return None
