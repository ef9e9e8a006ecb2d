"""The report-signing key file, as the evidence log needs it: read (never created) and
installed atomically (``dragent evidence rotate-signing-key``)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from replicators.errors import KeyAccessError


def read_private_key(path: Path) -> Ed25519PrivateKey | None:
    """The Ed25519 private key in ``path`` (PEM, PKCS#8), or None if there is no file.

    Raises ``KeyAccessError`` if the file is unreadable or holds something else.
    """
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyAccessError(f"cannot read signing key {path}: {exc}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyAccessError(f"{path}: not a PEM private key without password: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyAccessError(f"{path}: not an Ed25519 private key")
    return key


def same_key(a: Ed25519PrivateKey | None, b: Ed25519PrivateKey | None) -> bool:
    if a is None or b is None:
        return a is b
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    return a.public_key().public_bytes(*raw) == b.public_key().public_bytes(*raw)


def install_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Make ``key`` the key at ``path`` (mode 0600) and its public key ``<path>.pub``.

    Each file is written to a temporary name, flushed to disk and renamed over
    the old one, then the directory is flushed: after a crash ``path`` holds
    either the old key or the new one, whole.
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, pem, 0o600)
    _replace(path.with_name(path.name + ".pub"), pub, 0o644)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
