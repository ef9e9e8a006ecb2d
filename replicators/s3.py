"""``ObjectStore`` over S3 (AWS S3, SeaweedFS, MinIO) through aiobotocore.

Retries live in exactly one layer: botocore's own ("standard" mode with
``max_attempts`` from the config). This module only classifies what is left
into ``NotFound`` / ``AlreadyExists`` / ``AccessDenied`` / ``Unavailable`` and
puts a deadline around every call.

Every single-request PUT carries a CRC32C of its body (``x-amz-checksum-crc32c``,
hardware-accelerated by ``google-crc32c``), which the server checks before it
stores anything, so a body damaged on the way is refused (``Unavailable``,
retried), never stored. botocore would otherwise compute a CRC32 in Python at
about 1 GB/s on the event loop.

botocore's own work per request is cut where that changes nothing we rely on
(``Tuning``, ``TUNING``): no parameter validation, a User-Agent built once per
client, S3's timestamps parsed without dateutil.

With ``S3Config.data_client = "obstore"`` (the default) the single PUTs, GETs and
HEADs go through ``replicators.s3_obstore`` instead, where it can make them exactly:
there a PUT's body is covered by the SigV4 payload hash, or (``sign_payload=False``)
by an ``x-amz-checksum-sha256`` the server checks, not by a CRC32C.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.utils
import functools
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from typing import Any, ClassVar

import aiobotocore.session
import botocore.handlers
import botocore.utils
import google_crc32c
from aiobotocore.config import AioConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from replicators import s3_clients, s3_obstore
from replicators.errors import (
    AccessDenied,
    AlreadyExists,
    IntegrityError,
    NotFound,
    StorageError,
    Unavailable,
)
from replicators.s3_tls import SharedTLSSession
from replicators.settings import S3Config
from replicators.store import ObjectInfo

LIST_PAGE = 1000
"""Keys asked for per LIST request (S3's most)."""
_NOT_FOUND = {"NoSuchKey", "NotFound", "404", "NoSuchVersion"}
_EXISTS = {"PreconditionFailed", "412"}
_DENIED = {
    "AccessDenied",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "NoSuchBucket",
}


def classify(exc: Exception, key: str) -> StorageError:
    """Map a botocore error to the store's error kinds."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = f"s3 {code or status}: {exc.response.get('Error', {}).get('Message', '')}"
        if code in _NOT_FOUND or status == 404:
            if code == "NoSuchBucket":
                return AccessDenied(message, key=key, hint="create the bucket or fix its name")
            return NotFound(message, key=key)
        if code in _EXISTS or status == 412:
            return AlreadyExists(message, key=key)
        if code in _DENIED or status == 403:
            return AccessDenied(message, key=key, hint="check the credentials and bucket policy")
        return Unavailable(message, key=key)
    if isinstance(exc, BotoCoreError | OSError | TimeoutError):
        return Unavailable(f"s3 unreachable: {type(exc).__name__}: {exc}", key=key)
    raise exc


_CRC32C_NATIVE = google_crc32c.implementation == "c"  # the pure-Python fallback is slower


def crc32c_header(data: bytes) -> str:
    """The ``x-amz-checksum-crc32c`` value of ``data`` (base64 of the big-endian CRC32C)."""
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def parse_timestamp(value: Any) -> dt.datetime:
    """botocore's ``parse_timestamp`` for the two forms S3 sends, by the standard
    library's parsers instead of dateutil's general one: ``2026-12-07T03:18:26.000Z``
    (listings) and ``Mon, 07 Dec 2026 03:18:26 GMT`` (``Last-Modified``). The same
    instant; anything else (epochs, offsets, other spellings, invalid dates) goes to
    botocore's, which gives its own errors."""
    if isinstance(value, str):
        if value.endswith("Z") and "T" in value:
            with suppress(ValueError):
                return dt.datetime.fromisoformat(value)
        elif value.endswith(" GMT"):
            with suppress(TypeError, ValueError):
                return email.utils.parsedate_to_datetime(value)
    return botocore.utils.parse_timestamp(value)


@dataclass(frozen=True, slots=True)
class Tuning:
    """botocore's per-request work that ``s3_client`` turns off or does more cheaply.
    ``BOTOCORE`` is botocore's own behaviour, ``TUNING`` dragent's; each option is
    measured alone and together by ``benchmarks/s3_request_cpu.py`` (figures below:
    ms of CPU per request in this process, 16 KiB objects on SeaweedFS, median of 7
    rounds of 500 on two shared cores, about ±5 % noise)."""

    parameter_validation: bool = True
    """Check every call's parameters against the service model before sending (types,
    required members, lengths). Off: 1-7 % per request, 10 % per LIST page; what our
    calls could get wrong is an empty Key, which ``S3Store._call`` refuses itself."""
    request_checksum_calculation: str | None = None
    """``None``: botocore's default, ``when_supported`` (or the environment's): a CRC32
    of every PutObject/UploadPart body sent without a checksum of ours (``Bucket.write``,
    parts), which the server checks and stores. ``when_required``: none; over HTTP the
    SigV4 payload hash still covers the body, over HTTPS botocore then SHA-256-signs it
    instead of an unsigned aws-chunked body with a CRC32 trailer. Not applied: a
    change on the wire and in what is stored, for ~7 % of a small ``Bucket.write``."""
    response_checksum_validation: str | None = None
    """``None``: botocore's default, ``when_supported``: every GetObject asks for the
    object's checksum (``x-amz-checksum-mode: ENABLED``) and, for a whole-object GET of
    an object stored with CRC32, SHA-1 or SHA-256 (as ``Bucket.write``'s are), checks
    the body against it (ranged GETs and CRC32C/CRC64NVME objects, such as our
    segments, are not checked without awscrt). Not applied: the objects kind hashes
    the source body as it was received, so this is the only check of that GET; ~6 %."""
    static_user_agent: bool = False
    """Build the User-Agent once per client (botocore's string for the client, without
    the per-request feature ids ``m/...``, telemetry for AWS) instead of twice per
    request: 12-15 % per request."""
    fast_timestamps: bool = False
    """Parse S3's two timestamp forms with ``parse_timestamp`` instead of dateutil's
    general parser: 10-12 % per GET/HEAD (Last-Modified), 58 % per LIST page."""


BOTOCORE = Tuning()
TUNING = Tuning(parameter_validation=False, static_user_agent=True, fast_timestamps=True)
"""Together, before -> after: PUT 0.85 -> 0.74 ms, GET 0.83 -> 0.68, HEAD 0.75 -> 0.61,
LIST page of 500 keys 55.6 -> 26.5 ms (benchmarks/s3_request_cpu.py)."""


@functools.cache
def _session(fast_timestamps: bool) -> aiobotocore.session.AioSession:
    """One botocore session per process: its loader keeps the service models it parsed,
    so a client after the first costs about 20 ms of CPU instead of 90 (an agent of a
    group opens a few per partition it takes); one more only for ``BOTOCORE``'s timestamp
    parser (the benchmark), as the parser is the session's."""
    session = aiobotocore.session.get_session()
    # botocore asks for "100-continue" before every PUT body: one more round trip per
    # PUT, which across regions is most of a segment's latency. A refused PUT costs us
    # its body's bytes once instead (segments are small; large objects go in parts).
    session.unregister("before-call.s3", botocore.handlers.add_expect_header)
    if fast_timestamps:  # -10 % CPU per GET/HEAD, -58 % per LIST page (``Tuning``)
        parsers = session.get_component("response_parser_factory")
        parsers.set_parser_defaults(timestamp_parser=parse_timestamp)
    return session


def _user_agent(session: aiobotocore.session.AioSession, config: Config) -> str:
    """The User-Agent botocore would send for ``config``, less the per-request feature
    ids (``m/...``) and less the session's extra, which botocore appends to a given one."""
    creator = session.get_component("user_agent_creator")
    creator.set_session_config(  # as create_client does before every client
        session_user_agent_name=session.user_agent_name,
        session_user_agent_version=session.user_agent_version,
        session_user_agent_extra=session.user_agent_extra,
    )
    appid = config.user_agent_appid or session.get_config_variable("user_agent_appid")
    if appid:  # AWS_SDK_UA_APP_ID or sdk_ua_app_id, as botocore reads them for a client
        config = config.merge(Config(user_agent_appid=appid))
    ua = creator.with_client_config(config).to_string()
    parts = [p for p in ua.split(" ") if not p.startswith("m/")]
    if session.user_agent_extra and parts[-1] == session.user_agent_extra:
        parts.pop()
    return " ".join(parts)


def s3_client(cfg: S3Config, *, sign_payload: bool | None = None, tuning: Tuning = TUNING) -> Any:
    """An aiobotocore S3 client for ``cfg`` (an async context manager); botocore retries.

    ``sign_payload=False`` leaves request bodies out of the SigV4 signature (one
    SHA-256 pass over every body fewer, on both sides): only for stores whose objects
    are authenticated by their own format (sealed segments and packs), where a changed
    body is rejected on every read. ``None`` keeps botocore's choice (signed over
    plain HTTP, unsigned over HTTPS with a checksum). ``tuning``: see ``Tuning``.
    """
    creds: dict[str, str] = {}
    if cfg.access_key is not None and cfg.secret_key is not None:
        creds = {
            "aws_access_key_id": cfg.access_key.reveal(),
            "aws_secret_access_key": cfg.secret_key.reveal(),
        }
    # ``TUNING`` takes 13-19 % of the CPU of a request and half of a LIST page's, all
    # in botocore (``Tuning`` gives each option's share and what it turns off).
    options: dict[str, Any] = {"parameter_validation": tuning.parameter_validation}
    if tuning.request_checksum_calculation is not None:
        options["request_checksum_calculation"] = tuning.request_checksum_calculation
    if tuning.response_checksum_validation is not None:
        options["response_checksum_validation"] = tuning.response_checksum_validation
    options |= {
        "connect_timeout": cfg.connect_timeout,
        "read_timeout": cfg.read_timeout,
        "retries": {"mode": "standard", "max_attempts": cfg.max_attempts},
        "s3": {"addressing_style": cfg.addressing_style}
        | ({} if sign_payload is None else {"payload_signing_enabled": sign_payload}),
        "max_pool_connections": cfg.max_concurrency,
    }
    session = _session(tuning.fast_timestamps)
    if tuning.static_user_agent:
        options["user_agent"] = _user_agent(session, Config(**options))
    config = AioConfig(http_session_cls=SharedTLSSession, **options)
    return session.create_client(
        "s3", endpoint_url=cfg.endpoint, region_name=cfg.region_name, config=config, **creds
    )


def _client_key(cfg: S3Config, sign_payload: bool | None) -> tuple[Any, ...]:
    """Everything ``s3_client`` builds a client from (not the bucket, not the prefix)."""
    return (
        cfg.endpoint,
        cfg.region_name,
        cfg.access_key,
        cfg.secret_key,
        cfg.addressing_style,
        cfg.max_attempts,
        cfg.connect_timeout,
        cfg.read_timeout,
        cfg.max_concurrency,
        sign_payload,
        TUNING,
    )


class S3Store:
    """An S3 bucket (optionally under a key prefix). Create with ``await S3Store.open(cfg)``."""

    KIND: ClassVar[str] = "s3"

    def __init__(self, cfg: S3Config, client: Any, stack: AsyncExitStack) -> None:
        self.cfg = cfg
        self._client = client
        self._fast: s3_obstore.FastS3 | None = None
        """The ``obstore`` client of the hot requests (``S3Config.data_client``): set by
        ``open``; None (every request through botocore) for a store built otherwise."""
        self._stack = stack
        self._deadline = (cfg.connect_timeout + cfg.read_timeout) * cfg.max_attempts
        self._parts = asyncio.Semaphore(cfg.max_concurrency)

    @classmethod
    async def open(cls, cfg: S3Config, *, sign_payload: bool | None = None) -> S3Store:
        """Open the store; ``sign_payload`` as for ``s3_client``. Stores of one event loop
        that would build the same botocore client share it (``s3_clients``)."""
        key = _client_key(cfg, sign_payload)
        client = await s3_clients.acquire(key, lambda: s3_client(cfg, sign_payload=sign_payload))
        stack = AsyncExitStack()
        stack.push_async_callback(s3_clients.release, key)
        store = cls(cfg, client, stack)
        if cfg.data_client == "obstore":
            store._fast = s3_obstore.FastS3.open(cfg, sign_payload=sign_payload)
        return store

    def _key(self, key: str) -> str:
        return self.cfg.prefix + key

    def _fast_for(
        self, key: str, metadata: Mapping[str, str] | None = None
    ) -> s3_obstore.FastS3 | None:
        """The ``obstore`` client if it makes this request exactly (else botocore)."""
        fast = self._fast
        return fast if fast is not None and fast.usable(self._key(key), metadata) else None

    async def _fast_call(self, key: str, call: Any) -> Any:
        """Await ``call`` (an ``obstore`` request) within the deadline; errors classified."""
        try:
            async with asyncio.timeout(self._deadline):
                return await call
        except s3_obstore.ERRORS as exc:
            raise s3_obstore.classify(exc, key) from exc

    async def _call(self, key: str, op: str, **kwargs: Any) -> Any:
        try:
            if kwargs.get("Key", True) == "":
                # The one model check that matters with parameter_validation off: an empty
                # Key would address the bucket itself (a GET would read its listing).
                raise ParamValidationError(
                    report="Invalid length for parameter Key, value: 0, valid min length: 1"
                )
            async with asyncio.timeout(self._deadline):
                return await getattr(self._client, op)(Bucket=self.cfg.bucket, **kwargs)
        except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
            raise classify(exc, key) from exc

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
        lock: bool = True,
    ) -> None:
        """Write ``data`` at ``key`` (``if_absent``: create-only, else ``AlreadyExists``).

        With ``object_lock`` configured, the version written carries an Object Lock
        retention (its mode, until now + ``retain``), on a single PUT and a multipart
        upload alike; ``lock=False`` leaves it out (a temporary object deleted right
        after, which a lock would keep until its date)."""
        extra: dict[str, Any] = {"Metadata": dict(metadata or {})}
        if lock and self.cfg.object_lock is not None:
            until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.cfg.object_lock.retain)
            extra["ObjectLockMode"] = self.cfg.object_lock.mode
            extra["ObjectLockRetainUntilDate"] = until
        if len(data) > self.cfg.multipart_threshold:
            await self._put_multipart(key, data, if_absent, extra)
            return
        fast = None if "ObjectLockMode" in extra else self._fast_for(key, extra["Metadata"])
        if fast is not None:
            call = fast.put(self._key(key), data, create=if_absent, metadata=extra["Metadata"])
            await self._fast_call(key, call)
            return
        if if_absent:
            extra["IfNoneMatch"] = "*"
        if _CRC32C_NATIVE:
            extra["ChecksumCRC32C"] = crc32c_header(data)
        await self._call(key, "put_object", Key=self._key(key), Body=data, **extra)

    async def _put_multipart(
        self, key: str, data: bytes, if_absent: bool, extra: dict[str, Any]
    ) -> None:
        full = self._key(key)
        upload = await self._call(key, "create_multipart_upload", Key=full, **extra)
        upload_id = upload["UploadId"]
        chunk = int(self.cfg.multipart_chunk)
        view = memoryview(data)

        async def part(number: int, offset: int) -> dict[str, Any]:
            async with self._parts:
                body = bytes(view[offset : offset + chunk])
                out = await self._call(
                    key, "upload_part", Key=full, UploadId=upload_id, PartNumber=number, Body=body
                )
                return {"PartNumber": number, "ETag": out["ETag"]}

        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(part(i + 1, off))
                    for i, off in enumerate(range(0, len(data), chunk))
                ]
            parts = [t.result() for t in tasks]
            cond = {"IfNoneMatch": "*"} if if_absent else {}
            await self._call(
                key,
                "complete_multipart_upload",
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **cond,
            )
        except BaseException:
            await asyncio.shield(self._abort(key, full, upload_id))
            raise

    async def _abort(self, key: str, full: str, upload_id: str) -> None:
        # An orphaned upload left by a failed abort is reclaimed by the bucket's lifecycle rule.
        with suppress(StorageError):
            await self._call(key, "abort_multipart_upload", Key=full, UploadId=upload_id)

    async def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """The object's bytes. With ``max_bytes``, an object larger than that is refused
        (``IntegrityError``) from its ``Content-Length``, before its body is read."""
        if (fast := self._fast_for(key)) is not None:
            result = await self._fast_call(key, fast.get(self._key(key)))
            size = int(result.meta["size"])
            if max_bytes is not None and size > max_bytes:
                raise IntegrityError(
                    f"{size} bytes, more than the {max_bytes} allowed here: not read",
                    where=f"object {key}",
                )
            return await self._fast_call(key, fast.body(result))
        out = await self._call(key, "get_object", Key=self._key(key))
        size = int(out.get("ContentLength", 0))
        if max_bytes is not None and size > max_bytes:
            out["Body"].close()
            raise IntegrityError(
                f"{size} bytes, more than the {max_bytes} allowed here: not read",
                where=f"object {key}",
            )
        try:
            async with asyncio.timeout(self._deadline), out["Body"] as body:
                return await body.read()
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise classify(exc, key) from exc

    async def stat(self, key: str) -> ObjectInfo:
        if (fast := self._fast_for(key)) is not None:
            result = await self._fast_call(key, fast.get(self._key(key), head=True))
            size, etag, _, _, metadata = fast.state(result)
            return ObjectInfo(key=key, size=size, etag=etag, metadata=metadata)
        out = await self._call(key, "head_object", Key=self._key(key))
        return ObjectInfo(
            key=key,
            size=int(out["ContentLength"]),
            etag=str(out.get("ETag", "")).strip('"'),
            metadata=dict(out.get("Metadata", {})),
        )

    async def pages(
        self, prefix: str, *, start_after: str | None = None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The raw ``ListObjectsV2`` entries under ``prefix``, one page (≤ 1000) at a time,
        in key order; keys keep the config's prefix (``strip`` it with ``len(cfg.prefix)``)."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": self._key(prefix), "MaxKeys": LIST_PAGE}
            if token:
                kwargs["ContinuationToken"] = token
            elif start_after is not None:
                kwargs["StartAfter"] = self._key(start_after)
            page = await self._call(prefix, "list_objects_v2", **kwargs)
            yield page.get("Contents", [])
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    async def list(
        self, prefix: str, *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        strip = len(self.cfg.prefix)
        async for page in self.pages(prefix, start_after=start_after):
            for item in page:
                yield ObjectInfo(
                    key=item["Key"][strip:],
                    size=int(item["Size"]),
                    etag=str(item.get("ETag", "")).strip('"'),
                )

    async def delete(self, key: str) -> None:
        with suppress(NotFound):
            await self._call(key, "delete_object", Key=self._key(key))

    async def children(self, prefix: str) -> list[str]:
        """The names one level below ``prefix`` (``prefix/<name>/...``): a LIST with a
        delimiter, one request per 1,000 names, whatever each holds."""
        strip, names, token = len(self._key(prefix)), [], None
        while True:
            kwargs: dict[str, Any] = {"Prefix": self._key(prefix), "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call(prefix, "list_objects_v2", **kwargs)
            names += [c["Prefix"][strip:].rstrip("/") for c in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return names
            token = page["NextContinuationToken"]

    async def purge(self, key: str) -> None:
        """Delete every version of ``key``: on a versioned bucket (Object Lock needs one) a
        plain DELETE only hides the object behind a delete marker. A version under Object
        Lock is refused by the store: ``AccessDenied``, after the others are deleted."""
        full = self._key(key)
        out = await self._call(key, "list_object_versions", Prefix=full, MaxKeys=1000)
        found = [
            v["VersionId"]
            for v in [*out.get("Versions", []), *out.get("DeleteMarkers", [])]
            if v.get("Key") == full
        ]
        refused: AccessDenied | None = None
        for version in found or [None]:
            extra = {"VersionId": version} if version else {}
            try:
                with suppress(NotFound):
                    await self._call(key, "delete_object", Key=full, **extra)
            except AccessDenied as exc:
                refused = exc
        if refused is not None:
            raise refused

    async def aclose(self) -> None:
        await self._stack.aclose()
