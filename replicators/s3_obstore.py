"""The hot S3 requests of a data path (single PUT, GET, ranged GET, HEAD) through
``obstore`` (Rust ``object_store``, its own HTTP client, SigV4 and retries), behind
``S3Store`` and ``Bucket`` when ``S3Config.data_client = "obstore"``.

One request costs about a third of botocore's CPU for a PUT or HEAD and about half
for a GET (16 KiB objects on SeaweedFS, ``benchmarks/s3_request_cpu.py``'s way).
Everything else stays on botocore: multipart uploads, listings, deletes, versions,
Object Lock retentions. So does every request this client cannot make exactly as
botocore would (``FastS3.usable``):

- a key ``object_store`` would change or refuse: an empty segment (``a//b``), a
  leading or trailing ``/`` (a "folder" object ``dir/`` would be written as
  ``dir``), a ``.`` or ``..`` segment, control characters;
- user metadata named like one of ``object_store``'s attributes (``Content-Type``,
  ``Cache-Control``...), which it would send as that header instead, or not ASCII.

What botocore does and this client does not: check a whole-object GET's body against
the checksum the object was stored with (botocore's ``response_checksum_validation``,
kept on in ``replicators.s3.Tuning``; obstore asks for none), so over plain HTTP a
body damaged on the way back is caught by TCP's checksum only (over HTTPS, by TLS);
and store a CRC32 with what ``Bucket.write`` puts (a signed PUT's body is checked by
the server against the SigV4 payload hash instead, and stored without a checksum).

Errors are the store's (``classify``): ``NotFound``, ``AlreadyExists`` (a failed
``If-Match`` or ``If-None-Match: *``), ``AccessDenied``, ``Unavailable``. Retries:
``object_store``'s own, ``max_attempts - 1`` of them within the caller's deadline.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from collections.abc import Mapping
from typing import Any

import obstore
from obstore import exceptions as obx
from obstore.store import S3Store as _ObS3

from replicators.errors import AccessDenied, AlreadyExists, NotFound, StorageError, Unavailable
from replicators.s3_tls import bundle_stamp
from replicators.settings import S3Config

_ATTRIBUTES = (
    "Content-Disposition",
    "Content-Encoding",
    "Content-Language",
    "Content-Type",
    "Cache-Control",
    "Storage-Class",
)
"""``object_store``'s attribute names, as it spells them in a result's attributes (user
metadata comes back under its lower-case name). A user metadata key spelled like one,
in any case, would be sent as that header, not as ``x-amz-meta-...``."""
_RESERVED = frozenset(name.lower() for name in _ATTRIBUTES)


def exact_key(key: str) -> bool:
    """True if ``object_store`` addresses ``key`` unchanged (see the module's doc)."""
    if not key or key[0] == "/" or key[-1] == "/" or "//" in key:
        return False
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        return False
    return not any(part in (".", "..") for part in key.split("/"))


def plain_metadata(metadata: Mapping[str, str]) -> bool:
    """True if every key of ``metadata`` goes out as ``x-amz-meta-<key>``, and all of it
    is ASCII (botocore refuses the rest before sending: the same error either way)."""
    return all(
        name.isascii() and value.isascii() and name.lower() not in _RESERVED
        for name, value in metadata.items()
    )


def classify(exc: Exception, key: str) -> StorageError:
    """Map an ``obstore`` error to the store's error kinds (as ``replicators.s3.classify``)."""
    first = next(iter(str(exc).splitlines()), "")  # obstore's messages go on for pages
    if not first and isinstance(exc, TimeoutError):
        first = "no answer within the deadline"
    message = f"s3 (obstore) {type(exc).__name__}: {first[:300]}"
    if "<Code>NoSuchBucket</Code>" in str(exc):
        return AccessDenied(message, key=key, hint="create the bucket or fix its name")
    if isinstance(exc, FileNotFoundError | obx.NotFoundError):
        return NotFound(message, key=key)
    if isinstance(exc, obx.PreconditionError | obx.AlreadyExistsError):
        return AlreadyExists(message, key=key)
    if isinstance(exc, obx.PermissionDeniedError | obx.UnauthenticatedError):
        return AccessDenied(message, key=key, hint="check the credentials and bucket policy")
    if isinstance(exc, obx.BaseError | OSError | TimeoutError):
        return Unavailable(message, key=key)
    raise exc


ERRORS = (obx.BaseError, OSError, TimeoutError)
"""What ``classify`` maps (``FileNotFoundError`` is an ``OSError``)."""


def time_ns(when: dt.datetime) -> int:
    """As ``replicators.bucket._ns``: microseconds, then nanoseconds."""
    return int(when.timestamp() * 1_000_000) * 1000


_PROXY_ENV = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
"""Proxies botocore takes from the environment (with ``NO_PROXY``); ``object_store`` is
given one otherwise (``proxy_url``), not mapped here: with any of these set (any case),
every request goes through botocore."""


@functools.lru_cache(maxsize=64)
def _store(
    cfg: S3Config, sign_payload: bool | None, bundle: tuple[str, int, int] | None
) -> _ObS3 | None:
    """An ``object_store`` client for ``cfg`` (``bundle``: the CA bundle to trust too, by
    path, size and modification time); None if the bundle cannot be read."""
    assert cfg.access_key is not None and cfg.secret_key is not None
    deadline = (cfg.connect_timeout + cfg.read_timeout) * cfg.max_attempts
    options: dict[str, Any] = {
        "connect_timeout": dt.timedelta(seconds=cfg.connect_timeout),
        "read_timeout": dt.timedelta(seconds=cfg.read_timeout),
        # the whole request, body included (botocore has none): the caller's deadline
        "timeout": dt.timedelta(seconds=deadline),
        "pool_max_idle_per_host": str(cfg.max_concurrency),
    }
    if cfg.endpoint is not None and cfg.endpoint.startswith("http://"):
        options["allow_http"] = True
    elif bundle is not None:
        try:
            with open(bundle[0], "rb") as f:
                options["root_certificate"] = f.read()
        except OSError:
            return None  # botocore says what is wrong with it
    extra: dict[str, Any] = {}
    if cfg.endpoint is not None:
        extra["endpoint"] = cfg.endpoint
    credential = {
        "access_key_id": cfg.access_key.reveal(),
        "secret_access_key": cfg.secret_key.reveal(),
        "token": None,  # not AWS_SESSION_TOKEN's, as botocore with explicit keys
        "expires_at": None,  # asked once
    }
    return _ObS3(
        cfg.bucket,
        region=cfg.region_name,
        credential_provider=lambda: credential,  # type: ignore[arg-type,return-value]
        virtual_hosted_style_request=cfg.addressing_style != "path",
        # sign_payload=False: as botocore's, the body out of the signature (sealed
        # segments); then a SHA-256 checksum header lets the server check the body.
        unsigned_payload=sign_payload is False,
        skip_signature=False,
        conditional_put="etag",
        **({"checksum_algorithm": "sha256"} if sign_payload is False else {}),
        client_options=options,  # type: ignore[arg-type]
        retry_config={
            "max_retries": cfg.max_attempts - 1,
            "retry_timeout": dt.timedelta(seconds=deadline),
        },
        **extra,
    )


class FastS3:
    """An ``obstore`` S3 client for one ``S3Config``'s bucket; keys are full keys (the
    config's prefix included). ``FastS3.open`` returns None where it cannot stand in for
    botocore: no explicit keys (botocore's credential chain), ``addressing_style =
    "auto"`` with an endpoint or with a bucket name holding a dot (botocore's choice
    between path and virtual), a proxy in the environment. Over HTTPS, the CA bundle
    botocore would take from ``AWS_CA_BUNDLE`` is trusted too (added to the system's
    roots; botocore trusts only the bundle's)."""

    def __init__(self, store: _ObS3) -> None:
        self._store = store

    @classmethod
    def open(cls, cfg: S3Config, *, sign_payload: bool | None = None) -> FastS3 | None:
        """The client for ``cfg``, or None (see the class). One per configuration and
        CA bundle per process: building one loads its TLS roots, more CPU than a request."""
        if cfg.access_key is None or cfg.secret_key is None:
            return None
        if cfg.addressing_style == "auto" and (cfg.endpoint is not None or "." in cfg.bucket):
            return None
        if any(os.environ.get(n) or os.environ.get(n.lower()) for n in _PROXY_ENV):
            return None
        bundle: tuple[str, int, int] | None = None
        plain = cfg.endpoint is not None and cfg.endpoint.startswith("http://")
        if not plain and (path := os.environ.get("AWS_CA_BUNDLE")):
            if (stamp := bundle_stamp(path)) is None:
                return None  # botocore says what is wrong with it
            bundle = (path, *stamp)
        # keys are full keys: the prefix is the caller's (alike stores share the client)
        store = _store(cfg.model_copy(update={"prefix": ""}), sign_payload, bundle)
        return None if store is None else cls(store)

    @staticmethod
    def usable(key: str, metadata: Mapping[str, str] | None = None) -> bool:
        """True if this client makes the request for ``key`` (and ``metadata``) exactly."""
        return exact_key(key) and (metadata is None or plain_metadata(metadata))

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        create: bool = False,
        content_type: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """One PUT (``create``: ``If-None-Match: *``)."""
        attributes: dict[str, str] = dict(metadata or {})
        if content_type:
            attributes["Content-Type"] = content_type
        await obstore.put_async(
            self._store,
            key,
            data,
            attributes=attributes,  # type: ignore[arg-type]
            mode="create" if create else "overwrite",
            use_multipart=False,
        )

    async def get(
        self,
        key: str,
        *,
        if_match: str = "",
        start: int | None = None,
        end: int | None = None,
        head: bool = False,
    ) -> Any:
        """The ``obstore.GetResult`` of a GET (``head``: a HEAD); body not read yet."""
        options: dict[str, Any] = {}
        if if_match:
            options["if_match"] = f'"{if_match}"'
        if start is not None and end is not None:
            options["range"] = (start, end)
        if head:
            options["head"] = True
        return await obstore.get_async(self._store, key, options=options)  # type: ignore[arg-type]

    @staticmethod
    def state(result: Any) -> tuple[int, str, int, str, dict[str, str]]:
        """(size, etag, time_ns, content type, user metadata) of a GET or HEAD result."""
        meta, attributes = result.meta, dict(result.attributes)
        content_type = attributes.pop("Content-Type", "")
        for name in _ATTRIBUTES:
            attributes.pop(name, None)
        return (
            int(meta["size"]),
            str(meta.get("e_tag") or "").strip('"'),
            time_ns(meta["last_modified"]),
            str(content_type),
            attributes,
        )

    @staticmethod
    async def body(result: Any) -> bytes:
        return bytes(await result.bytes_async())
