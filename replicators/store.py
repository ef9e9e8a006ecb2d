"""The object-store interface every storage kind implements.

Contract (the contract tests in tests/test_store.py run it against every kind):

- ``put(key, data, if_absent=True)`` publishes ``data`` atomically: a reader
  sees the whole object or none of it, never a part. With ``if_absent`` it
  raises ``AlreadyExists`` when the key exists (publish-once). Without it, it
  overwrites.
- ``get(key)`` returns the whole body or raises ``NotFound``.
- ``stat(key)`` returns ``ObjectInfo`` or raises ``NotFound``.
- ``list(prefix, start_after=...)`` yields ``ObjectInfo`` in ascending key
  order, lazily, page by page (memory bounded by one page).
- ``delete(key)`` is idempotent: deleting a missing key is not an error.
- Every method may raise ``Unavailable`` (retried by the caller's loop) or
  ``AccessDenied`` (not retried). Retries inside a store are left to the
  storage library's own retry layer; a store never retries on top of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


class ObjectStore(Protocol):
    KIND: ClassVar[str]

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> None: ...

    async def get(self, key: str, *, max_bytes: int | None = None) -> bytes: ...

    async def stat(self, key: str) -> ObjectInfo: ...

    def list(self, prefix: str, *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]: ...

    async def delete(self, key: str) -> None: ...

    async def aclose(self) -> None: ...
