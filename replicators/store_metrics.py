"""Requests to any ``ObjectStore`` counted and timed; ``build_store`` composes them.

``InstrumentedStore`` counts requests by operation and outcome and times them
(``dragent_store_requests_total``, ``dragent_store_request_seconds``): the
request rate is a cost an operator pays, so it is measured.

It also counts what a bill is made of, per stream and destination (docs/cost.md):

- ``dragent_billed_requests_total{stream,destination,class}``: the HTTP requests the
  store sends, by billing class (``PUT``: put, each part of a multipart upload and
  its create and complete; ``GET``; ``HEAD`` (stat); ``LIST``: one per page of at
  most 1,000 keys; ``DELETE``), whatever their outcome (a refused create-only PUT is
  billed too). A retry inside botocore is not seen here (one request counted).
- ``dragent_cross_region_bytes_total{stream,destination}``: for a store in another
  region (a peer's vault), the bytes of every PUT into it and every GET from it.
- ``dragent_vault_stored_bytes{stream,destination}``: a running sum of the bytes put
  minus the bytes deleted (an overwrite subtracts the old size when it is known).
  The size of a deleted key is known only if this store saw it recently (put, listed
  or stat'ed: the last ``SIZE_CACHE`` keys); a delete of an unknown size changes
  nothing (no guess). The agent seeds it at start from its cost log (agent/costlog.py).
- ``dragent_vault_written_objects_total`` / ``dragent_vault_written_bytes_total``
  ``{stream,destination}``: objects (a multipart upload is one) and bytes written.

The stream of a request is the second component of its key under the vault's
areas (``streams/<s>/``, ``artifacts/<s>/``, ``backups/<s>/``); any other key (the
create-only probe) counts as stream ``-``. With ``streams`` given, a name not in it
counts as ``-`` too, so the label's values are bounded by the configuration.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from replicators.errors import StorageError
from replicators.s3 import S3Store
from replicators.settings import S3Config
from replicators.store import ObjectInfo, ObjectStore

CLASSES = ("PUT", "GET", "HEAD", "LIST", "DELETE")
"""Billing classes of requests, as an S3 bill groups them."""
NO_STREAM = "-"
AREAS = ("streams", "artifacts", "backups")
LIST_PAGE = 1000
"""Keys per ``ListObjectsV2`` page (``S3Store.pages`` asks for 1,000)."""
SIZE_CACHE = 100_000
"""Keys whose size a store remembers (put, listed, stat'ed), for deletes."""


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
        sd = ["stream", "destination"]
        self.billed = Counter(
            "dragent_billed_requests",
            "HTTP requests sent to an object store, by stream, destination and billing class.",
            [*sd, "class"],
            registry=registry,
        )
        self.cross_region = Counter(
            "dragent_cross_region_bytes",
            "Bytes put into or got from a store in another region (a peer's vault).",
            sd,
            registry=registry,
        )
        self.stored = Gauge(
            "dragent_vault_stored_bytes",
            "Bytes stored in a vault: running sum of puts minus deletes of known size.",
            sd,
            registry=registry,
        )
        self.written_objects = Counter(
            "dragent_vault_written_objects",
            "Objects written into a vault (a multipart upload is one).",
            sd,
            registry=registry,
        )
        self.written_bytes = Counter(
            "dragent_vault_written_bytes",
            "Bytes written into a vault.",
            sd,
            registry=registry,
        )


def stream_of(key: str, streams: Collection[str] | None = None) -> str:
    """The stream a key (or a listing prefix) belongs to, ``-`` if none."""
    parts = key.split("/", 2)
    if len(parts) < 3 or parts[0] not in AREAS or not parts[1]:
        return NO_STREAM
    if streams is not None and parts[1] not in streams:
        return NO_STREAM
    return parts[1]


def put_requests(size: int, cfg: S3Config | None) -> int:
    """HTTP requests one successful PUT of ``size`` bytes takes: one, or for a multipart
    upload (above ``multipart_threshold``) its create, its parts and its complete."""
    if cfg is None or size <= int(cfg.multipart_threshold):
        return 1
    return 2 + math.ceil(size / int(cfg.multipart_chunk))


class InstrumentedStore:
    KIND: ClassVar[str] = "instrumented"

    def __init__(
        self,
        inner: ObjectStore,
        metrics: StoreMetrics,
        name: str,
        *,
        destination: str | None = None,
        cross_region: bool = False,
        streams: Collection[str] | None = None,
    ) -> None:
        self.inner = inner
        self._m = metrics
        self._name = name
        self._dest = destination if destination is not None else name.removeprefix("vault-")
        self._cross = cross_region
        self._streams = frozenset(streams) if streams is not None else None
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._s3cfg = inner.cfg if isinstance(inner, S3Store) else None

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

    # -- cost ---------------------------------------------------------------------------
    def _stream(self, key: str) -> str:
        return stream_of(key, self._streams)

    def _bill(self, stream: str, cls: str, n: int = 1) -> None:
        self._m.billed.labels(stream, self._dest, cls).inc(n)

    def _remember(self, key: str, size: int) -> None:
        self._sizes[key] = size
        self._sizes.move_to_end(key)
        while len(self._sizes) > SIZE_CACHE:
            self._sizes.popitem(last=False)

    def _transferred(self, stream: str, n: int) -> None:
        if self._cross:
            self._m.cross_region.labels(stream, self._dest).inc(n)

    # -- ObjectStore --------------------------------------------------------------------
    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        stream, size = self._stream(key), len(data)
        try:
            with self._measure("put"):
                await self.inner.put(key, data, if_absent=if_absent, metadata=metadata)
        except BaseException:
            self._bill(stream, "PUT")  # a refused or failed PUT is one request (at least)
            raise
        self._bill(stream, "PUT", put_requests(size, self._s3cfg))
        self._transferred(stream, size)
        self._m.written_objects.labels(stream, self._dest).inc()
        self._m.written_bytes.labels(stream, self._dest).inc(size)
        old = self._sizes.get(key, 0) if not if_absent else 0
        self._m.stored.labels(stream, self._dest).inc(size - old)
        self._remember(key, size)

    async def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        stream = self._stream(key)
        try:
            with self._measure("get"):
                data = await self.inner.get(key, max_bytes=max_bytes)
        finally:
            self._bill(stream, "GET")
        self._transferred(stream, len(data))
        return data

    async def stat(self, key: str) -> ObjectInfo:
        try:
            with self._measure("stat"):
                info = await self.inner.stat(key)
        finally:
            self._bill(self._stream(key), "HEAD")
        self._remember(key, info.size)
        return info

    async def list(
        self, prefix: str, *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        stream, seen = self._stream(prefix), 0
        self._bill(stream, "LIST")  # the first page, even if empty
        with self._measure("list"):
            async for info in self.inner.list(prefix, start_after=start_after):
                if seen and seen % LIST_PAGE == 0:
                    self._bill(stream, "LIST")  # the store fetched one more page
                seen += 1
                self._remember(info.key, info.size)
                yield info

    async def delete(self, key: str) -> None:
        stream = self._stream(key)
        try:
            with self._measure("delete"):
                await self.inner.delete(key)
        finally:
            self._bill(stream, "DELETE")
        size = self._sizes.pop(key, None)
        if size is not None:  # unknown size: not guessed
            self._m.stored.labels(stream, self._dest).dec(size)

    async def children(self, prefix: str) -> list[str]:
        """``S3Store.children`` where the inner store has it (one LIST per 1,000 names)."""
        children = getattr(self.inner, "children", None)
        if children is None:
            raise NotImplementedError("the inner store lists no delimited children")
        self._bill(self._stream(prefix), "LIST")
        with self._measure("list"):
            names: list[str] = await children(prefix)
        return names

    async def purge(self, key: str) -> None:
        """Delete every version of ``key`` where the inner store can (``S3Store.purge``:
        a versioned bucket keeps old versions behind a plain DELETE), else ``delete``.
        Counted as one LIST (the versions listed) and one DELETE (a lower bound: one per
        version is sent; DELETE is free on S3); stored bytes as for ``delete``."""
        purge = getattr(self.inner, "purge", None)
        if purge is None:
            await self.delete(key)
            return
        stream = self._stream(key)
        try:
            with self._measure("purge"):
                await purge(key)
        finally:
            self._bill(stream, "LIST")
            self._bill(stream, "DELETE")
        size = self._sizes.pop(key, None)
        if size is not None:
            self._m.stored.labels(stream, self._dest).dec(size)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def build_store(
    cfg: S3Config,
    metrics: StoreMetrics | None,
    name: str,
    *,
    destination: str | None = None,
    cross_region: bool = False,
    streams: Collection[str] | None = None,
) -> ObjectStore:
    """The one place stores are composed: the S3 store, then instrumentation.

    ``destination`` names the vault's region in the cost metrics (default: ``name``
    without ``vault-``); ``cross_region`` says the store is in another region (its
    PUT and GET bytes are counted as transfer between regions); ``streams`` bounds
    the ``stream`` label to the configured names."""
    store: ObjectStore = await S3Store.open(cfg)
    if metrics is not None:
        store = InstrumentedStore(
            store,
            metrics,
            name,
            destination=destination,
            cross_region=cross_region,
            streams=streams,
        )
    return store
