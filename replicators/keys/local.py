"""``LocalKeyProvider`` (``"local"``): KEKs from a key file; for the lab, tests and
air-gapped sites."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import ClassVar

from replicators.errors import KeyAccessError
from replicators.keys.keyfile import _KeyFile, _read_key_file, unwrap_local, wrap_local
from replicators.keys.provider import Clock, _KeyCache
from replicators.segment import KEY_SIZE, DataKey


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

    def _changed(self) -> bool:
        try:
            st = self.path.stat()
        except OSError:
            return True
        return (st.st_ino, st.st_size, st.st_mtime_ns) != self._stamp

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
        """The data key inside ``wrapped`` (see ``KeyProvider``). A version the key file
        revokes is refused (``KeyAccessError`` naming it), cached or not: the file is
        checked for a change (one ``stat``) on every call."""
        keys = self._file if self._file is not None and not self._changed() else None
        if keys is None:
            keys = await self._keys()
        if key_id in keys.revoked:
            raise self._revoked(key_id)
        hit = self._cache.lookup(key_id, wrapped)
        if hit is not None:
            return hit
        kek = keys.keys.get(key_id)
        if kek is None:
            raise KeyAccessError(
                f"key {key_id!r} is not in key file {self.path}",
                hint="the segment was wrapped by a key version this file lacks; restore it",
            )
        plaintext = unwrap_local(kek, key_id, wrapped)
        self._cache.remember(key_id, wrapped, plaintext)
        return plaintext

    def _revoked(self, key_id: str) -> KeyAccessError:
        return KeyAccessError(
            f"key version {key_id!r} is revoked in key file {self.path}: "
            "nothing wrapped under it is opened",
            hint="a compromised key: re-key what it wrapped (dragent rekey) before revoking",
        )

    async def aclose(self) -> None:
        self._cache.clear()
        self._file = None


# --- AWS KMS -----------------------------------------------------------------------------------
