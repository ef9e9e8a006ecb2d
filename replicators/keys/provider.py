"""What every key provider is (``KeyProvider``), and the cache of data keys and unwrapped
keys they share. Key material never appears in a repr, a log line or an error message."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar, Protocol

from replicators.segment import DataKey

_UNWRAP_CACHE = 256

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
      above. Old KEK versions stay usable, so old segments stay readable, unless
      revoked (a key file's ``revoked`` list: ``KeyAccessError`` naming the version).
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
