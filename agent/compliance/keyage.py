"""When was each key-encryption key created? (from what the key files already record)

A local key file (``replicators/keys/keyfile.py``) has no creation time per version,
but every version id it generates is ``k-YYYYmmdd-HHMMSS-<hex>``: the UTC
time the version was created. ``created_at`` parses that; an id of another
shape (a KMS key ARN, a hand-written id) gives None ("unknown"). For AWS KMS
the age of the key material depends on KMS's own rotation, which this module
does not query.
"""

from __future__ import annotations

import calendar
import json
import re
import time
from pathlib import Path
from typing import Any

from replicators.settings import KeysConfig

_KEY_ID = re.compile(r"^k-(\d{8}-\d{6})-[0-9a-f]+$")


def created_at(key_id: str) -> float | None:
    """Unix time encoded in a local key version id, or None."""
    match = _KEY_ID.match(key_id)
    if not match:
        return None
    try:
        return float(calendar.timegm(time.strptime(match.group(1), "%Y%m%d-%H%M%S")))
    except ValueError:
        return None


def current_key_id(cfg: KeysConfig) -> str | None:
    """The current version id of a local key file (None for KMS or an unreadable file).

    Reads only the file's ``current`` field; key material is never looked at.
    """
    if cfg.provider != "local" or cfg.key_file is None:
        return cfg.kms_key_id
    try:
        doc = json.loads(Path(cfg.key_file).read_text())
    except (OSError, ValueError):
        return None
    current = doc.get("current") if isinstance(doc, dict) else None
    return current if isinstance(current, str) else None


def key_versions(cfg: KeysConfig) -> set[str] | None:
    """The version ids a local key file holds (None for KMS or an unreadable file).
    Reads only the ids; key material is never looked at."""
    if cfg.provider != "local" or cfg.key_file is None:
        return None
    try:
        doc = json.loads(Path(cfg.key_file).read_text())
    except (OSError, ValueError):
        return None
    versions = doc.get("keys") if isinstance(doc, dict) else None
    return set(versions) if isinstance(versions, dict) else None


def key_ages(keys: dict[str, KeysConfig]) -> dict[str, tuple[str | None, float | None]]:
    """For each named key: (current version id, its creation time or None)."""
    out: dict[str, tuple[str | None, float | None]] = {}
    for name, cfg in keys.items():
        key_id = current_key_id(cfg)
        out[name] = (key_id, created_at(key_id) if key_id else None)
    return out


def named_keys(cfg: Any) -> dict[str, KeysConfig]:
    """The KEKs an agent uses, by metric label: ``kek`` (its own: what it unwraps with)
    and ``kek-<peer>`` (what it wraps with for each destination)."""
    return {"kek": cfg.keys, **{f"kek-{p.name}": p.keys for p in cfg.peers}}
