"""``AwsKmsKeyProvider`` (``"aws-kms"``): AWS KMS ``GenerateDataKey`` and ``Decrypt``
through aiobotocore; a segment's key id must be this region's key or an allowed older one
before Decrypt is called."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from contextlib import AsyncExitStack
from typing import Any, ClassVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from replicators.errors import IntegrityError, KeyAccessError, Unavailable
from replicators.keys.provider import Clock, _KeyCache
from replicators.segment import KEY_SIZE, DataKey

KMS_CONTEXT = {"purpose": "dragent-segment"}


_KMS_INTEGRITY = {"InvalidCiphertextException", "IncorrectKeyException"}
_KMS_TRANSIENT = {
    "ThrottlingException",
    "DependencyTimeoutException",
    "KMSInternalException",
    "LimitExceededException",
    "ServiceUnavailableException",
    "InternalFailure",
    "RequestTimeout",
}


class AwsKmsKeyProvider:
    """KEK in AWS KMS: ``GenerateDataKey`` (AES_256) and ``Decrypt``, both with the
    encryption context ``{"purpose": "dragent-segment"}``.

    The key id recorded in segments is the ``KeyId`` KMS returns (the key
    ARN). Each call runs under ``asyncio.timeout(timeout)``; botocore does not
    retry (retry lives in the caller's loop, which retries ``Unavailable``).
    Errors: ``InvalidCiphertextException``/``IncorrectKeyException`` become
    ``IntegrityError``; throttling, 5xx, timeouts and connection failures
    ``Unavailable``; anything else (not found, access denied, disabled key…)
    ``KeyAccessError``. Credentials come from the usual AWS chain.
    """

    KIND: ClassVar[str] = "aws-kms"

    def __init__(
        self,
        kms_key_id: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        data_key_reuse: float = 300.0,
        timeout: float = 10.0,
        clock: Clock = time.monotonic,
        allowed: Iterable[str] = (),
    ) -> None:
        self.kms_key_id, self.endpoint_url, self.region = kms_key_id, endpoint_url, region
        self.timeout = timeout
        self.allowed = set(allowed)
        self._resolved = False
        self._cache = _KeyCache(data_key_reuse, clock)
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"AwsKmsKeyProvider({self.kms_key_id!r}, region={self.region!r})"

    async def _kms(self) -> Any:
        if self._client is None:
            config = AioConfig(
                connect_timeout=self.timeout,
                read_timeout=self.timeout,
                retries={"total_max_attempts": 1},
            )
            client = get_session().create_client(
                "kms", region_name=self.region, endpoint_url=self.endpoint_url, config=config
            )
            self._client = await self._stack.enter_async_context(client)
        return self._client

    async def _call(self, operation: str, key_id: str, **params: Any) -> dict[str, Any]:
        """Run one KMS operation (a client method name) under the deadline; map its errors."""
        where = f"kms {operation} {key_id}"
        try:
            async with asyncio.timeout(self.timeout):
                client = await self._kms()
                return dict(await getattr(client, operation)(**params))
        except TimeoutError:
            raise Unavailable(f"{where}: no answer in {self.timeout:g} s", key=key_id) from None
        except ClientError as exc:
            raise _kms_error(where, key_id, exc.response) from None
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise Unavailable(f"{where}: {type(exc).__name__}: {exc}", key=key_id) from None

    async def data_key(self) -> DataKey:
        """A data key from ``GenerateDataKey`` (see ``KeyProvider``)."""
        async with self._lock:  # one GenerateDataKey at a time; the others reuse its key
            cached = self._cache.fresh()
            if cached is not None:
                return cached
            resp = await self._call(
                "generate_data_key",
                self.kms_key_id,
                KeyId=self.kms_key_id,
                KeySpec="AES_256",
                EncryptionContext=KMS_CONTEXT,
            )
            key = DataKey(
                str(resp["KeyId"]), bytes(resp["Plaintext"]), bytes(resp["CiphertextBlob"])
            )
            return self._cache.keep(key)

    async def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        """The data key inside ``wrapped``, via ``Decrypt`` (see ``KeyProvider``). The
        segment's key id must be this provider's key (as configured, or its ARN from
        ``DescribeKey``) or one of ``allowed`` (older keys): anything else is refused
        before KMS is asked, with ``KeyAccessError``."""
        hit = self._cache.lookup(key_id, wrapped)
        if hit is not None:
            return hit
        await self._check_key_id(key_id)
        resp = await self._call(
            "decrypt", key_id, CiphertextBlob=wrapped, KeyId=key_id, EncryptionContext=KMS_CONTEXT
        )
        plaintext = bytes(resp["Plaintext"])
        if len(plaintext) != KEY_SIZE:
            raise IntegrityError(f"kms returned a {len(plaintext)}-byte data key", where=key_id)
        self._cache.remember(key_id, wrapped, plaintext)
        return plaintext

    async def _check_key_id(self, key_id: str) -> None:
        if key_id in self.allowed or key_id == self.kms_key_id:
            return
        if not self._resolved:
            resp = await self._call("describe_key", self.kms_key_id, KeyId=self.kms_key_id)
            meta = resp.get("KeyMetadata", {})
            self.allowed |= {str(v) for v in (meta.get("Arn"), meta.get("KeyId")) if v}
            self._resolved = True
        if key_id not in self.allowed:
            raise KeyAccessError(
                f"segment sealed under KMS key {key_id}, not this region's key "
                f"{self.kms_key_id}: refused before Decrypt",
                hint="an older key of this region? list it in [keys] kms_allowed_keys",
            )

    async def aclose(self) -> None:
        self._cache.clear()
        self._client = None
        await self._stack.aclose()


def _kms_error(where: str, key_id: str, response: dict[str, Any]) -> Exception:
    error = response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    message = f"{where}: {code}: {error.get('Message', '')}".rstrip(": ")
    if code in _KMS_INTEGRITY:
        return IntegrityError(message, hint="the wrapped data key does not belong to this KMS key")
    if code in _KMS_TRANSIENT or status >= 500:
        return Unavailable(message, key=key_id)
    return KeyAccessError(message, hint="check the KMS key's state, policy and grants")
