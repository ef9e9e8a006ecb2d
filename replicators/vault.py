"""The vault: the segment log of every stream, kept in the destination region's store.

Layout (docs/vault-layout.md): ``streams/<stream>/<epoch:010d>/<seq:020d>.seg``.
Zero-padded numbers make the store's lexicographic listing the log's order
(epoch first, then seq). A segment is published once (create-only write) and
never changed: its name is its identity, so a re-sent segment is detected
rather than applied twice. Sealed blobs the log only refers to (artifacts
packs) are published beside it the same way (``put_blob``).
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from replicators.errors import AlreadyExists, IntegrityError, StorageError
from replicators.keys import KeyProvider, build_key_provider
from replicators.s3 import S3Store
from replicators.store import ObjectStore

if TYPE_CHECKING:
    from replicators.settings import KeysConfig, S3Config

_NAME = re.compile(r"^streams/([a-z0-9][a-z0-9-]*)/(\d{10})/(\d{20})\.seg$")


@dataclass(frozen=True, order=True)
class SegmentRef:
    """Names one segment. Orders as the log does: by epoch, then seq."""

    epoch: int
    seq: int
    stream: str

    @property
    def key(self) -> str:
        return f"streams/{self.stream}/{self.epoch:010d}/{self.seq:020d}.seg"

    @classmethod
    def parse(cls, key: str) -> SegmentRef:
        match = _NAME.match(key)
        if not match:
            raise IntegrityError(f"not a segment name: {key!r}", where="vault")
        return cls(epoch=int(match.group(2)), seq=int(match.group(3)), stream=match.group(1))


class Vault:
    """Segment log operations over one ``ObjectStore``. Errors are the store's."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def put_segment(self, ref: SegmentRef, blob: bytes) -> None:
        """Publish a segment once. Raises ``AlreadyExists`` if the name is taken."""
        await self.store.put(ref.key, blob, if_absent=True)

    async def put_blob(self, key: str, blob: bytes) -> None:
        """Publish a sealed blob the log refers to but does not hold (an artifacts pack),
        beside the segments and create-only like them. The segments' namespace
        (``streams/``) is refused. Raises ``AlreadyExists`` if the name is taken."""
        if key.startswith("streams/") or not key or key.startswith("/"):
            raise ValueError(f"{key!r} is not a name for a blob beside the log")
        await self.store.put(key, blob, if_absent=True)

    async def get_segment(self, ref: SegmentRef, max_bytes: int | None = None) -> bytes:
        """The segment's bytes; with ``max_bytes``, a larger object is refused before its
        body is read (``IntegrityError``: a segment this stream writes is never that big)."""
        return await self.store.get(ref.key, max_bytes=max_bytes)

    async def segments(
        self, stream: str, after: SegmentRef | None = None
    ) -> AsyncIterator[SegmentRef]:
        """Yield the stream's segments in log order, strictly after ``after``.

        Keys under the stream's prefix that are not segment names are skipped.
        """
        prefix = f"streams/{stream}/"
        async for info in self.store.list(prefix, start_after=after.key if after else None):
            if _NAME.match(info.key):
                yield SegmentRef.parse(info.key)

    async def epoch_segments(
        self, stream: str, epoch: int, from_seq: int
    ) -> AsyncIterator[SegmentRef]:
        """Yield the stream's segments of one epoch from ``from_seq`` on, in order."""
        prefix = f"streams/{stream}/{epoch:010d}/"
        after = SegmentRef(epoch, from_seq - 1, stream).key if from_seq > 0 else None
        async for info in self.store.list(prefix, start_after=after):
            if _NAME.match(info.key):
                yield SegmentRef.parse(info.key)


PROBE_PREFIX = "probes/create-only-"


async def check_create_only(store: ObjectStore) -> None:
    """Prove that ``store`` honours create-only writes (``If-None-Match: *``), which the
    vault's "publish once" rests on: write a probe object twice, expect the second to be
    refused, delete it. Raises ``IntegrityError`` if the second write succeeded (the
    store would let a re-sent segment replace a published one); the store's own errors
    (unavailable, access denied) pass through unchanged."""
    key = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
    await store.put(key, b"1", if_absent=True)
    try:
        await store.put(key, b"2", if_absent=True)
    except AlreadyExists:
        return
    finally:
        with contextlib.suppress(StorageError):
            await store.delete(key)
    raise IntegrityError(
        "the vault's store accepted a second create-only write of one key: it ignores "
        "If-None-Match, so a published segment could be replaced",
        where="vault",
        hint="use an S3 server that supports conditional writes (AWS S3, SeaweedFS, MinIO)",
    )


@contextlib.asynccontextmanager
async def open_vault(store_cfg: S3Config, keys_cfg: KeysConfig) -> AsyncIterator[Opened]:
    """A region's vault and the key provider that opens (or seals for) it, both closed when
    the block ends: ``async with open_vault(cfg.vault, cfg.keys) as (vault, keys)``."""
    store = await S3Store.open(store_cfg)
    try:
        keys = build_key_provider(keys_cfg)
        try:
            yield Opened(Vault(store), keys)
        finally:
            await keys.aclose()
    finally:
        await store.aclose()


class Opened(NamedTuple):
    vault: Vault
    keys: KeyProvider
