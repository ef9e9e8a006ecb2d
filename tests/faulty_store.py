"""``FaultyStore`` fails a seeded fraction of calls with ``Unavailable`` before or after
the inner call (a write that "fails" after it happened is the case that catches
double-apply bugs). For tests only."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Mapping
from typing import ClassVar

from replicators.errors import Unavailable
from replicators.store import ObjectInfo, ObjectStore


class FaultyStore:
    """Fails ``rate`` of calls (seeded): half before the inner call, half after it."""

    KIND: ClassVar[str] = "faulty"

    def __init__(self, inner: ObjectStore, rate: float, seed: int) -> None:
        self.inner = inner
        self.rate = rate
        self._rng = random.Random(seed)
        self.injected = 0

    def _roll(self, op: str, key: str) -> str | None:
        if self._rng.random() >= self.rate:
            return None
        self.injected += 1
        return "before" if self._rng.random() < 0.5 else "after"

    def _fail(self, op: str, key: str, when: str) -> Unavailable:
        return Unavailable(f"injected fault {when} {op}", key=key)

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        when = self._roll("put", key)
        if when == "before":
            raise self._fail("put", key, when)
        await self.inner.put(key, data, if_absent=if_absent, metadata=metadata)
        if when == "after":
            raise self._fail("put", key, when)

    async def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        if self._roll("get", key):
            raise self._fail("get", key, "before")
        return await self.inner.get(key, max_bytes=max_bytes)

    async def stat(self, key: str) -> ObjectInfo:
        if self._roll("stat", key):
            raise self._fail("stat", key, "before")
        return await self.inner.stat(key)

    async def list(
        self, prefix: str, *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        if self._roll("list", prefix):
            raise self._fail("list", prefix, "before")
        async for info in self.inner.list(prefix, start_after=start_after):
            yield info

    async def delete(self, key: str) -> None:
        when = self._roll("delete", key)
        if when == "before":
            raise self._fail("delete", key, when)
        await self.inner.delete(key)
        if when == "after":
            raise self._fail("delete", key, when)

    async def aclose(self) -> None:
        await self.inner.aclose()
