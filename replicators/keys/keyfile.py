"""Local key files (``dragent-kek/1``): several KEK versions, one current; generated and
rotated crash-safely, refused when readable by group or others; and how a data key is
wrapped under one of its versions (AES-256-GCM).

A version may be revoked (``"revoked": [ids]``, ``revoke_key_version``): after a KEK
compromise and a complete ``dragent rekey``, the provider refuses to unwrap anything
under it, naming the version. The current version cannot be revoked."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from replicators.errors import IntegrityError, KeyAccessError
from replicators.segment import KEY_SIZE

KEY_FILE_FORMAT = "dragent-kek/1"
_WRAP_VERSION = b"\x01"
_WRAP_AAD = b"dragent-wrap-v1:"
_NONCE_SIZE = 12


class _KeyFile:
    """A parsed key file: KEK versions by id and the current one. Repr hides the keys."""

    __slots__ = ("current", "keys", "revoked")

    def __init__(
        self, current: str, keys: dict[str, bytes], revoked: frozenset[str] = frozenset()
    ) -> None:
        self.current, self.keys, self.revoked = current, keys, revoked

    def __repr__(self) -> str:
        revoked = f", revoked={sorted(self.revoked)}" if self.revoked else ""
        return f"_KeyFile(current={self.current!r}, versions={sorted(self.keys)}{revoked})"


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
    revoked = doc.get("revoked", [])
    if not isinstance(revoked, list) or not all(isinstance(r, str) for r in revoked):
        raise bad("'revoked' must be a list of key ids")
    if current in revoked:
        raise bad(f"the current key {current!r} is revoked: rotate to a new one")
    return _KeyFile(current, keys, frozenset(revoked))


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
    body: dict[str, object] = {
        "format": KEY_FILE_FORMAT,
        "current": doc.current,
        "keys": {key_id: key.hex() for key_id, key in doc.keys.items()},
    }
    if doc.revoked:
        body["revoked"] = sorted(doc.revoked)
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
    _replace(path, _KeyFile(key_id, keys, doc.revoked))
    return key_id


def _replace(path: Path, doc: _KeyFile) -> None:
    tmp = _write_new(path, doc)
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path)


def revoke_key_version(path: Path, key_id: str) -> bool:
    """Revoke KEK version ``key_id`` in ``path``: from now on nothing wrapped under it is
    unwrapped (``KeyAccessError`` naming the version). The key material is kept, so the
    revocation can be undone by editing the file. Atomic like ``rotate_key_file``; returns
    False if it was already revoked. Raises ``KeyAccessError`` if the version is not in
    the file or is the current one (rotate first)."""
    doc = _read_key_file(path)
    if key_id in doc.revoked:
        return False
    if key_id not in doc.keys:
        raise KeyAccessError(f"key {key_id!r} is not in key file {path}")
    if key_id == doc.current:
        raise KeyAccessError(
            f"key {key_id!r} is the current key of {path}: it cannot be revoked",
            hint=f"rotate first (dragent keys rotate {path}), then re-key (dragent rekey)",
        )
    _replace(path, _KeyFile(doc.current, doc.keys, doc.revoked | {key_id}))
    return True


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
