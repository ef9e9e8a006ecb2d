"""Key-encryption-key (KEK) providers: data keys for sealing, unwrapping for opening.

Envelope encryption (docs/segment-format.md, "Keys"): every segment carries a
32-byte data key wrapped by the destination region's KEK, and the KEK's id.
A provider hands out a fresh data key and reuses it for up to
``data_key_reuse`` seconds, so a KMS is not called per segment; reuse is safe
because each segment derives its own key from the data key with HKDF and a
random salt. Two providers with the same shape:

- ``LocalKeyProvider`` (``"local"``): a key file with several KEK versions, one
  current; for the lab, tests and air-gapped sites.
- ``AwsKmsKeyProvider`` (``"aws-kms"``): AWS KMS ``GenerateDataKey`` and
  ``Decrypt`` through aiobotocore.

Key material never appears in a repr, a log line or an error message.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, ClassVar, Protocol

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from replicators.errors import IntegrityError, KeyAccessError, Unavailable
from replicators.segment import KEY_SIZE, DataKey, OpenedSegment, open_segment, read_header
from replicators.settings import KeysConfig

KEY_FILE_FORMAT = "dragent-kek/1"
KMS_CONTEXT = {"purpose": "dragent-segment"}
_WRAP_VERSION = b"\x01"
_WRAP_AAD = b"dragent-wrap-v1:"
_NONCE_SIZE = 12
_UNWRAP_CACHE = 256
_INLINE_OPEN = 256 << 10  # open smaller blobs on the loop; larger ones in a worker thread

Clock = Callable[[], float]


class KeyProvider(Protocol):
    """Hands out data keys wrapped by the current KEK and unwraps them again.

    Contract, for every implementation:

    - ``data_key()`` returns a random 32-byte data key and its wrapped form,
      with ``key_id`` naming the KEK (version) that wrapped it. The same data
      key may be returned again for up to ``data_key_reuse`` seconds; after a
      KEK rotation the next call returns a key under the new KEK. Raises
      ``KeyAccessError`` if the KEK is missing, unreadable or refused, and
      ``Unavailable`` if the key service could not be reached (retry later).
    - ``unwrap(key_id, wrapped)`` returns the 32-byte data key. Idempotent and
      cached. Raises ``KeyAccessError`` if ``key_id`` is unknown, unreadable
      or refused, ``IntegrityError`` if ``wrapped`` fails authentication under
      that KEK (tampered, or wrapped under another key), ``Unavailable`` as
      above. Old KEK versions stay usable, so old segments stay readable.
    - ``aclose()`` releases connections and forgets cached keys; idempotent.

    Both coroutines may be called concurrently and cancelled at any await.
    """

    KIND: ClassVar[str]

    async def data_key(self) -> DataKey: ...

    async def unwrap(self, key_id: str, wrapped: bytes) -> bytes: ...

    async def aclose(self) -> None: ...


class _KeyCache:
    """The reused data key and recent unwrap results (bounded, least recently used out)."""

    def __init__(self, reuse: float, clock: Clock) -> None:
        self.reuse, self.clock = reuse, clock
        self._current: tuple[float, DataKey] | None = None
        self._unwrapped: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()

    def fresh(self, key_id: str | None = None) -> DataKey | None:
        """The reusable data key, if young enough (and wrapped by ``key_id`` when given)."""
        if self._current is None:
            return None
        born, key = self._current
        if self.clock() - born >= self.reuse or (key_id is not None and key.key_id != key_id):
            return None
        return key

    def keep(self, key: DataKey) -> DataKey:
        self._current = (self.clock(), key)
        self.remember(key.key_id, key.wrapped, key.plaintext)
        return key

    def lookup(self, key_id: str, wrapped: bytes) -> bytes | None:
        hit = self._unwrapped.get((key_id, wrapped))
        if hit is not None:
            self._unwrapped.move_to_end((key_id, wrapped))
        return hit

    def remember(self, key_id: str, wrapped: bytes, plaintext: bytes) -> None:
        self._unwrapped[(key_id, wrapped)] = plaintext
        while len(self._unwrapped) > _UNWRAP_CACHE:
            self._unwrapped.popitem(last=False)

    def clear(self) -> None:
        self._current = None
        self._unwrapped.clear()


# --- local key file -------------------------------------------------------------------------


class _KeyFile:
    """A parsed key file: KEK versions by id and the current one. Repr hides the keys."""

    __slots__ = ("current", "keys")

    def __init__(self, current: str, keys: dict[str, bytes]) -> None:
        self.current, self.keys = current, keys

    def __repr__(self) -> str:
        return f"_KeyFile(current={self.current!r}, versions={sorted(self.keys)})"


def _new_key_id() -> str:
    return f"k-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"


def _parse_key_file(path: Path, raw: bytes) -> _KeyFile:
    def bad(why: str) -> KeyAccessError:
        return KeyAccessError(f"key file {path}: {why}", hint="restore the key file from backup")

    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad("not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != KEY_FILE_FORMAT:
        raise bad(f"not a {KEY_FILE_FORMAT} key file")
    versions, current = doc.get("keys"), doc.get("current")
    if not isinstance(versions, dict) or current not in versions:
        raise bad("'current' must name one of 'keys'")
    keys: dict[str, bytes] = {}
    for key_id, hexkey in versions.items():
        try:
            keys[key_id] = bytes.fromhex(hexkey)
        except (TypeError, ValueError):
            raise bad(f"key {key_id!r} is not hex") from None
        if len(keys[key_id]) != KEY_SIZE:
            raise bad(f"key {key_id!r} is not {KEY_SIZE} bytes")
    return _KeyFile(current, keys)


def _read_key_file(path: Path) -> _KeyFile:
    """Parse the key file; refuses one that its group or others may read or write."""
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyAccessError(f"cannot read key file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise KeyAccessError(
            f"key file {path} is open to its group or others (mode {mode & 0o777:o}): "
            "a key-encryption key must be readable by its owner only",
            hint=f"chmod 600 {path}",
        )
    return _parse_key_file(path, raw)


def _write_new(path: Path, doc: _KeyFile) -> Path:
    """Write ``doc`` to a fresh temporary file next to ``path`` (mode 0600, fsynced)."""
    body = {
        "format": KEY_FILE_FORMAT,
        "current": doc.current,
        "keys": {key_id: key.hex() for key_id, key in doc.keys.items()},
    }
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_key_file(path: Path) -> str:
    """Create a key file with one new KEK version; return its key id.

    The file is created with mode 0600 and appears complete or not at all.
    Raises ``FileExistsError`` rather than overwrite an existing file (losing
    a KEK makes every segment it wrapped unreadable).
    """
    key_id = _new_key_id()
    tmp = _write_new(path, _KeyFile(key_id, {key_id: secrets.token_bytes(KEY_SIZE)}))
    try:
        os.link(tmp, path)  # atomic, and refuses to replace an existing file
    finally:
        tmp.unlink()
    _fsync_dir(path)
    return key_id


def rotate_key_file(path: Path) -> str:
    """Add a new KEK version to ``path``, make it current, keep the old ones; return its id.

    Atomic (temporary file, fsync, ``os.replace``, fsync of the directory).
    Running providers pick the new version up without a restart. Raises
    ``KeyAccessError`` if the file is missing or invalid. One rotation at a
    time: concurrent rotations of the same file may lose one of them.
    """
    doc = _read_key_file(path)
    key_id = _new_key_id()
    keys = {**doc.keys, key_id: secrets.token_bytes(KEY_SIZE)}
    tmp = _write_new(path, _KeyFile(key_id, keys))
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path)
    return key_id


def wrap_local(kek: bytes, key_id: str, plaintext: bytes) -> bytes:
    """Wrap a data key: ``0x01 || nonce || AES-256-GCM(kek, nonce, key, aad=label || key_id)``."""
    nonce = os.urandom(_NONCE_SIZE)
    aad = _WRAP_AAD + key_id.encode()
    return _WRAP_VERSION + nonce + AESGCM(kek).encrypt(nonce, plaintext, aad)


def unwrap_local(kek: bytes, key_id: str, wrapped: bytes) -> bytes:
    """Undo ``wrap_local``. Raises ``IntegrityError`` if ``wrapped`` fails authentication."""
    if len(wrapped) != 1 + _NONCE_SIZE + KEY_SIZE + 16 or wrapped[:1] != _WRAP_VERSION:
        raise IntegrityError("wrapped data key is malformed", where=f"key {key_id}")
    nonce, sealed = wrapped[1 : 1 + _NONCE_SIZE], wrapped[1 + _NONCE_SIZE :]
    try:
        return AESGCM(kek).decrypt(nonce, sealed, _WRAP_AAD + key_id.encode())
    except InvalidTag:
        raise IntegrityError(
            "wrapped data key failed authentication", where=f"key {key_id}"
        ) from None


class LocalKeyProvider:
    """KEKs from a local key file (JSON: format, current key id, hex keys by id).

    The file is re-read whenever its inode, size or mtime changes (checked on
    every ``data_key`` call and on every unwrap cache miss), so a rotation is
    picked up without a restart; the reused data key is dropped when the
    current version changes.
    """

    KIND: ClassVar[str] = "local"

    def __init__(
        self, path: Path, *, data_key_reuse: float = 300.0, clock: Clock = time.monotonic
    ) -> None:
        self.path = path
        self._cache = _KeyCache(data_key_reuse, clock)
        self._file: _KeyFile | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"LocalKeyProvider({str(self.path)!r})"

    def _refresh(self) -> _KeyFile:
        try:
            st = self.path.stat()
        except OSError as exc:
            raise KeyAccessError(f"cannot read key file {self.path}: {exc.strerror}") from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._file is None or stamp != self._stamp:
            self._file = _read_key_file(self.path)
            self._stamp = stamp
            self._cache.clear()  # a version may have been removed: forget what it unwrapped
        return self._file

    async def _keys(self) -> _KeyFile:
        async with self._lock:
            return await asyncio.to_thread(self._refresh)

    async def data_key(self) -> DataKey:
        """A data key wrapped by the current version (see ``KeyProvider``)."""
        keys = await self._keys()
        cached = self._cache.fresh(keys.current)
        if cached is not None:
            return cached
        plaintext = secrets.token_bytes(KEY_SIZE)
        wrapped = wrap_local(keys.keys[keys.current], keys.current, plaintext)
        return self._cache.keep(DataKey(keys.current, plaintext, wrapped))

    async def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        """The data key inside ``wrapped`` (see ``KeyProvider``)."""
        hit = self._cache.lookup(key_id, wrapped)
        if hit is not None:
            return hit
        kek = (await self._keys()).keys.get(key_id)
        if kek is None:
            raise KeyAccessError(
                f"key {key_id!r} is not in key file {self.path}",
                hint="the segment was wrapped by a key version this file lacks; restore it",
            )
        plaintext = unwrap_local(kek, key_id, wrapped)
        self._cache.remember(key_id, wrapped, plaintext)
        return plaintext

    async def aclose(self) -> None:
        self._cache.clear()
        self._file = None


# --- AWS KMS -----------------------------------------------------------------------------------

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


def build_key_provider(cfg: KeysConfig) -> KeyProvider:
    """The provider ``cfg`` describes (``cfg`` is already validated)."""
    if cfg.provider == "local":
        assert cfg.key_file is not None  # guaranteed by KeysConfig validation
        return LocalKeyProvider(cfg.key_file, data_key_reuse=cfg.data_key_reuse)
    assert cfg.kms_key_id is not None
    return AwsKmsKeyProvider(
        cfg.kms_key_id,
        endpoint_url=cfg.kms_endpoint,
        region=cfg.kms_region,
        data_key_reuse=cfg.data_key_reuse,
        allowed=cfg.kms_allowed_keys,
    )


async def unseal(
    blob: bytes,
    keys: KeyProvider,
    *,
    expect_stream: str | None = None,
    expect_epoch: int | None = None,
    expect_seq: int | None = None,
) -> OpenedSegment:
    """Read the header, unwrap its data key, verify and open the segment.

    Raises ``IntegrityError`` (bad segment or wrapped key), ``KeyAccessError``
    (KEK unknown or refused) or ``Unavailable`` (key service unreachable).
    Large segments are opened in a worker thread so the event loop keeps
    running; cancelling the call abandons the result.
    """
    header = read_header(blob)
    data_key = await keys.unwrap(header.key_id, header.wrapped_key)
    opener = functools.partial(
        open_segment,
        blob,
        data_key,
        expect_stream=expect_stream,
        expect_epoch=expect_epoch,
        expect_seq=expect_seq,
    )
    return opener() if len(blob) <= _INLINE_OPEN else await asyncio.to_thread(opener)
