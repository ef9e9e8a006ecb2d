"""Requests to any ``ObjectStore`` counted and timed; ``build_store`` composes them.

``InstrumentedStore`` counts requests by operation and outcome and times them
(``dragent_store_requests_total``, ``dragent_store_request_seconds``): the
request rate is a cost an operator pays, so it is measured.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter, Histogram

from replicators.errors import StorageError
from replicators.s3 import S3Store
from replicators.settings import S3Config
from replicators.store import ObjectInfo, ObjectStore


class StoreMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "dragent_store_requests",
            "Object-store requests by store, operation and outcome.",
            ["store", "op", "outcome"],
            registry=registry,
        )
        self.seconds = Histogram(
            "dragent_store_request_seconds",
            "Object-store request latency by store and operation.",
            ["store", "op"],
            registry=registry,
        )


class InstrumentedStore:
    KIND: ClassVar[str] = "instrumented"

    def __init__(self, inner: ObjectStore, metrics: StoreMetrics, name: str) -> None:
        self.inner = inner
        self._m = metrics
        self._name = name

    @contextmanager
    def _measure(self, op: str) -> Iterator[None]:
        started, outcome = time.monotonic(), "ok"
        try:
            yield
        except StorageError as exc:
            outcome = type(exc).__name__
            raise
        finally:
            self._m.requests.labels(self._name, op, outcome).inc()
            self._m.seconds.labels(self._name, op).observe(time.monotonic() - started)

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        with self._measure("put"):
            await self.inner.put(key, data, if_absent=if_absent, metadata=metadata)

    async def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        with self._measure("get"):
            return await self.inner.get(key, max_bytes=max_bytes)

    async def stat(self, key: str) -> ObjectInfo:
        with self._measure("stat"):
            return await self.inner.stat(key)

    async def list(
        self, prefix: str, *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        with self._measure("list"):
            async for info in self.inner.list(prefix, start_after=start_after):
                yield info

    async def delete(self, key: str) -> None:
        with self._measure("delete"):
            await self.inner.delete(key)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def build_store(cfg: S3Config, metrics: StoreMetrics | None, name: str) -> ObjectStore:
    """The one place stores are composed: the S3 store, then instrumentation."""
    store: ObjectStore = await S3Store.open(cfg)
    if metrics is not None:
        store = InstrumentedStore(store, metrics, name)
    return store
