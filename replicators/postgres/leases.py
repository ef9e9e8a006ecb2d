"""Leases on restore points: what a running restore (or drill) reads, retention keeps.

A restore writes a lease into the vault it reads from *before* it chooses its base
backup: ``leases/<stream>/<id>.json`` naming its target (a time, an LSN, or the
latest point) and a deadline it renews while it runs. The garbage collector keeps,
for every live lease, the backup that target needs and the WAL after it
(``gc.collect``), and reads the leases again just before it deletes anything, so a
restore that began after the collector's first look is seen too. A lease is plain
JSON, not sealed: a forged one can only make the collector keep more.

A restore that loses the race anyway (it chose its backup in the moment between the
collector's second look and its first delete) fails with a clear error (a missing
manifest, part or WAL: ``restore.fill_spool`` checks the join), never with a wrong
database. A lease whose holder died expires after its ``ttl`` and is deleted by the
next collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

from replicators.errors import IntegrityError, NotFound, StorageError
from replicators.store import ObjectStore

TTL = 120.0
"""Seconds a lease lives unless renewed (renewed every ``TTL / 4`` while held)."""


def lease_prefix(stream: str) -> str:
    return f"leases/{stream}/"


@dataclass(frozen=True)
class Lease:
    id: str
    stream: str
    holder: str
    target_time: float | None
    target_lsn: int | None
    expires_at: float

    @property
    def key(self) -> str:
        return f"{lease_prefix(self.stream)}{self.id}.json"

    def live(self, now: float) -> bool:
        return self.expires_at > now


def _parse(raw: bytes, key: str) -> Lease:
    try:
        d = json.loads(raw)
        lease = Lease(**d)
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"not a lease: {exc}", where=key) from None
    return lease


async def leases(store: ObjectStore, stream: str) -> list[Lease]:
    """Every lease of ``stream`` in the vault (live or not); unreadable ones are skipped
    (a lease being deleted, or not one of ours)."""
    out = []
    async for info in store.list(lease_prefix(stream)):
        with contextlib.suppress(NotFound, IntegrityError):
            out.append(_parse(await store.get(info.key, max_bytes=4096), info.key))
    return out


@contextlib.asynccontextmanager
async def held(
    store: ObjectStore,
    stream: str,
    *,
    target_time: float | None = None,
    target_lsn: int | None = None,
    ttl: float = TTL,
) -> AsyncIterator[Lease]:
    """Hold a lease on the restore point ``target`` (none: the latest) while the block
    runs: written before the block, renewed every ``ttl / 4``, deleted after it."""
    lease = Lease(
        id=f"{int(time.time())}-{secrets.token_hex(4)}",
        stream=stream,
        holder=socket.gethostname(),
        target_time=target_time,
        target_lsn=target_lsn,
        expires_at=time.time() + ttl,
    )
    await _write(store, lease)

    async def renew() -> None:
        nonlocal lease
        while True:
            await asyncio.sleep(ttl / 4)
            lease = Lease(**{**asdict(lease), "expires_at": time.time() + ttl})
            with contextlib.suppress(StorageError):  # the next renewal tries again
                await _write(store, lease)

    renewing = asyncio.create_task(renew())
    try:
        yield lease
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
        with contextlib.suppress(StorageError):
            await store.delete(lease.key)


async def _write(store: ObjectStore, lease: Lease) -> None:
    await store.put(lease.key, json.dumps(asdict(lease), sort_keys=True).encode())
