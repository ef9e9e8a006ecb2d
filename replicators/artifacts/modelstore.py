"""Where the active side reads its model store: a directory tree or an S3 prefix.

Both hold ``<model>/<version>/<files>`` with the names and completeness rules
of ``layout`` (a marker file, or a quiet period). ``open_model_store``
picks the kind from the options: ``[streams.artifacts.s3]`` set means the S3
prefix (``prefix``), else the directory ``root`` (``tree``).

Contract of a ``ModelStore`` (every kind):

- ``await scan()``: every version, sorted by (model, version), with its
  files sorted by path; hidden entries and unsafe names are skipped. Raises
  ``SourceError`` when the store cannot be listed; a store that is
  unreachable is never reported as empty.
- ``await scan_version(model, version)``: that version now, or None if it is
  gone. Same errors.
- ``reader(version, file)``: a synchronous binary reader of one file
  (``readinto``, ``close``) for a worker thread, reading the file as it was
  listed. Its reads raise ``Changed`` when the file changed or vanished since
  it was listed, ``OSError`` when it cannot be read.
- ``await wait(delay, stop)``: return after ``delay`` seconds, sooner when the
  store may have changed (a directory watch) or ``stop`` is set.
- ``await aclose()``; ``name`` says where the store is, for logs and reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

from replicators.artifacts.layout import FileInfo, VersionInfo
from replicators.errors import SourceError

if TYPE_CHECKING:
    import asyncio


class Changed(SourceError):
    """The file changed or vanished while it was read: the source tries the version again
    later; anything else reading (verify) reports it."""


class Reader(Protocol):
    def readinto(self, buffer: memoryview) -> int: ...

    def close(self) -> None: ...


class ModelStore(Protocol):
    KIND: ClassVar[str]
    name: str

    async def scan(self) -> list[VersionInfo]: ...

    async def scan_version(self, model: str, version: str) -> VersionInfo | None: ...

    def reader(self, version: VersionInfo, file: FileInfo) -> Reader: ...

    async def wait(self, delay: float, stop: asyncio.Event) -> None: ...

    async def aclose(self) -> None: ...
