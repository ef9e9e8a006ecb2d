"""Errors, grouped by what the caller does next.

- ``StorageError`` and its children come from an object store. ``Unavailable``
  is worth retrying; ``NotFound``, ``AlreadyExists`` and ``AccessDenied`` are
  answers, not faults.
- ``IntegrityError`` means bytes failed verification. It is never retried and
  nothing derived from those bytes may be applied; it should page a human.
- ``SourceError`` is a fault of a stream's source (a database, a bucket, a tree).
- ``KeyAccessError``: a key-encryption key is missing or refused.
"""

from __future__ import annotations


class DragentError(Exception):
    """Base of every error dragent raises on purpose. ``hint`` says what to do."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} (hint: {self.hint})" if self.hint else base


class StorageError(DragentError):
    """An object-store operation failed. ``key`` names the object when known."""

    def __init__(self, message: str, *, key: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.key = key


class NotFound(StorageError):
    """The object does not exist."""


class AlreadyExists(StorageError):
    """A create-only write found the object already there (publish-once)."""


class Unavailable(StorageError):
    """The store could not be reached or answered 5xx / throttled: retry later."""


class AccessDenied(StorageError):
    """Credentials or permissions refused: retrying will not help."""


class IntegrityError(DragentError):
    """Bytes failed verification (truncated, reordered, tampered, wrong key, gap).

    Never retried; nothing derived from the bytes may be applied.
    """

    def __init__(self, message: str, *, where: str = "", hint: str = "") -> None:
        super().__init__(f"{where}: {message}" if where else message, hint=hint)
        self.where = where


class KeyAccessError(DragentError):
    """A key-encryption key is missing, unreadable, or refused by the KMS."""


class SourceError(DragentError):
    """A stream's source failed (connection lost, slot gone, bucket unreadable)."""
