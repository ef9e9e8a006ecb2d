"""The model store as a directory tree (local disk or NFS): ``<root>/<model>/<version>/<files>``.

Listing is ``layout.scan`` in a worker thread; changes wake the source
through an inotify watch (watchfiles), with the periodic scan as the safety
net. A ``ModelStore`` (contract in ``modelstore``).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import BinaryIO, ClassVar

import watchfiles

from replicators.artifacts import layout
from replicators.artifacts.layout import FileInfo, VersionInfo

KIND = "directory"


class TreeStore:
    KIND: ClassVar[str] = KIND

    def __init__(self, root: Path, *, watch: bool = True) -> None:
        self.root = root
        self.watch = watch
        self.name = str(root)

    async def scan(self) -> list[VersionInfo]:
        return await asyncio.to_thread(layout.scan, self.root)

    async def scan_version(self, model: str, version: str) -> VersionInfo | None:
        return await asyncio.to_thread(layout.scan_version, self.root, model, version)

    def reader(self, version: VersionInfo, file: FileInfo) -> BinaryIO:
        """The file, unbuffered. Read, not memory-mapped: a file truncated while it is
        read gives short data (the caller checks the length), never SIGBUS."""
        return open(self.root / version.model / version.version / file.path, "rb", buffering=0)

    async def wait(self, delay: float, stop: asyncio.Event) -> None:
        woke = asyncio.Event()
        done = asyncio.Event()

        async def watch() -> None:
            if not self.watch or not self.root.is_dir():
                return
            with contextlib.suppress(OSError, RuntimeError):
                async for _ in watchfiles.awatch(self.root, stop_event=done, debounce=200, step=50):
                    woke.set()
                    return

        async def waiter() -> None:
            waits = [asyncio.ensure_future(e.wait()) for e in (woke, stop)]
            try:
                await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            done.set()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(watch())
            tg.create_task(waiter())

    async def aclose(self) -> None:
        return None
