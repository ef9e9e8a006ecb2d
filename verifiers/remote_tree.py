"""Read a peer's persisted mirror key tree over its agent's HTTP API.

The mirror's tree (``replicators.objects.trees``) sits beside the sink in the passive
region, while the verify runs in the active one. The passive agent serves it read-only:

- ``GET /api/v1/trees/{stream}``: depth, partitions, ``built_at``, ``built_from``,
  ``updated_at``, ``keys``, ``root`` and ``partition_roots`` (partition → root, hex, the
  non-empty ones);
- ``GET /api/v1/trees/{stream}/nodes?level=L&index=I,J,...``: up to ``MAX_BATCH`` nodes
  of one level (hex, or null for an empty subtree);
- ``GET /api/v1/trees/{stream}/bucket/{n}``: the keys of hash bucket ``n`` and their
  leaves (hex).

``RemoteTree`` is the client: ``load()`` reads the first (one request), then
``verifiers.objects.compare_trees`` descends level by level where the trees differ, one
batched request per level, then one request per differing bucket. It never imports the
agent: the caller gives the peer's URL and the API token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiohttp

MAX_BATCH = 512
"""Nodes per request (the indices go in the query string, which servers cap near 8 KiB)."""
CONCURRENCY = 8


class RemoteTreeError(Exception):
    """The peer's tree could not be read (unreachable, refused, absent, malformed)."""


class RemoteTree:
    """A peer's mirror tree of ``stream``, read from ``base_url`` (the peer's agent_url)
    with ``token`` (Bearer) when one is given. ``load()`` first; ``aclose()`` at the end."""

    def __init__(
        self,
        base_url: str,
        stream: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base = f"{base_url.rstrip('/')}/api/v1/trees/{stream}"
        self.stream = stream
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        self._session = session
        self._own = session is None
        self._info: dict[str, Any] | None = None
        self._roots: dict[int, bytes] = {}
        self.depth = 0
        self.partitions = 0

    @property
    def where(self) -> str:
        return self.base

    @property
    def built_at(self) -> float | None:
        return self._info.get("built_at") if self._info else None

    def info(self) -> dict[str, Any]:
        """What ``load()`` read, as ``TreeStore.info()`` says it (``path``: the URL)."""
        assert self._info is not None, "load() first"
        keep = ("depth", "partitions", "built_at", "built_from", "updated_at", "keys")
        return {"path": self.base, **{k: self._info.get(k) for k in keep}}

    async def _get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.get(
                self.base + path, params=params, headers=self.headers
            ) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:200]
                    raise RemoteTreeError(f"{self.base}{path}: HTTP {resp.status} {text}")
                body = await resp.json()
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise RemoteTreeError(f"{self.base}{path}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(body, dict):
            raise RemoteTreeError(f"{self.base}{path}: not a JSON object")
        return body

    async def load(self) -> dict[str, Any]:
        """Read the tree's summary and partition roots. Raises ``RemoteTreeError``."""
        body = await self._get("")
        try:
            self.depth, self.partitions = int(body["depth"]), int(body["partitions"])
            self._roots = {int(p): bytes.fromhex(r) for p, r in body["partition_roots"].items()}
            bytes.fromhex(body["root"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RemoteTreeError(f"{self.base}: malformed tree summary: {exc}") from None
        self._info = body
        return body

    async def root(self) -> bytes:
        assert self._info is not None, "load() first"
        return bytes.fromhex(self._info["root"])

    async def partition_roots(self) -> dict[int, bytes]:
        """Partition → root, as of ``load()``."""
        assert self._info is not None, "load() first"
        return dict(self._roots)

    async def nodes(self, level: int, indices: Sequence[int]) -> dict[int, bytes | None]:
        """Nodes of ``level`` (0: the root), by index from the left; None: an empty subtree."""
        chunks = [indices[i : i + MAX_BATCH] for i in range(0, len(indices), MAX_BATCH)]

        async def one(chunk: Sequence[int]) -> dict[str, Any]:
            params = {"level": str(level), "index": ",".join(map(str, chunk))}
            return await self._get("/nodes", params)

        out: dict[int, bytes | None] = {}
        for body in await _gather(one, chunks):
            try:
                for i, node in body["nodes"].items():
                    out[int(i)] = bytes.fromhex(node) if node is not None else None
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise RemoteTreeError(f"{self.base}/nodes: malformed answer: {exc}") from None
        return out

    async def leaves(self, buckets: Sequence[int]) -> dict[int, dict[str, bytes]]:
        """The keys of each hash bucket and their leaves."""

        async def one(n: int) -> tuple[int, dict[str, bytes]]:
            body = await self._get(f"/bucket/{n}")
            try:
                return n, {k: bytes.fromhex(v) for k, v in body["keys"].items()}
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise RemoteTreeError(f"{self.base}/bucket/{n}: malformed answer: {exc}") from None

        return dict(await _gather(one, list(buckets)))

    async def aclose(self) -> None:
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None


async def _gather(fn: Any, items: list[Any]) -> list[Any]:
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(item: Any) -> Any:
        async with sem:
            return await fn(item)

    return list(await asyncio.gather(*(one(i) for i in items)))
