"""The evidence log's format: hash-chained, signed entries (pure; no I/O).

Spec: docs/vault-layout.md, "Evidence log". One entry is one JSON object,
stored as its canonical encoding (sorted keys, no spaces, UTF-8)::

    {"format": "dragent-evidence/1", "region": "b", "seq": 7,
     "prev": "<sha256 hex of entry 6's stored bytes>", "time": 1795860000.0,
     "type": "drill.restore", "data": {...},
     "signature": {"alg": "ed25519", "key_id": "ed25519:...", "value": "<base64>"}}

The signature is Ed25519 (the region's report key, ``verifiers/report.py``)
over the canonical encoding of everything but ``signature``. Entry 0 has
``prev`` = 64 zeros and type ``evidence.genesis``; its data holds the
public key, which pins the key for the rest of the chain (a ``--public-key``
given by the auditor overrides it). ``check_chain`` finds a changed byte (not
canonical, bad signature, or a broken ``prev``), a removed entry (a gap in
``seq``, or a tail shorter than a known head) and a reordered one (``seq``
not the one its name says, ``prev`` mismatch).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from verifiers.report import canonical, key_id

FORMAT = "dragent-evidence/1"
GENESIS = "evidence.genesis"
ZERO = "0" * 64
PREFIX = "evidence/"
_NAME = re.compile(r"^evidence/([a-z0-9][a-z0-9-]*)/(\d{20})\.json$")


def entry_key(region: str, seq: int) -> str:
    """The vault key of entry ``seq`` of ``region``'s log."""
    return f"{PREFIX}{region}/{seq:020d}.json"


def parse_key(key: str) -> tuple[str, int] | None:
    """``(region, seq)`` from an entry's key, or None if ``key`` is not one."""
    match = _NAME.match(key)
    return (match.group(1), int(match.group(2))) if match else None


def encode(entry: dict[str, Any]) -> bytes:
    """The stored form: canonical JSON of the whole entry, signature included."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(raw: bytes) -> str:
    """The hash the next entry carries as ``prev``."""
    return hashlib.sha256(raw).hexdigest()


def public_pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def make_entry(
    *,
    region: str,
    seq: int,
    prev: str,
    time: float,
    kind: str,
    data: dict[str, Any],
    key: Ed25519PrivateKey,
) -> tuple[dict[str, Any], bytes]:
    """Build and sign one entry; return it and its stored bytes.

    ``data`` must be JSON-serialisable; floats are kept as JSON numbers.
    """
    body: dict[str, Any] = {
        "format": FORMAT,
        "region": region,
        "seq": seq,
        "prev": prev,
        "time": time,
        "type": kind,
        "data": data,
    }
    sig = key.sign(canonical(body))
    body["signature"] = {
        "alg": "ed25519",
        "key_id": key_id(key.public_key()),
        "value": base64.b64encode(sig).decode(),
    }
    raw = encode(body)
    return json.loads(raw), raw


def genesis(region: str, time: float, key: Ed25519PrivateKey) -> tuple[dict[str, Any], bytes]:
    """Entry 0: pins the public key that signs the log."""
    data = {"public_key": public_pem(key)}
    return make_entry(region=region, seq=0, prev=ZERO, time=time, kind=GENESIS, data=data, key=key)


@dataclass
class ChainReport:
    """What ``check_chain`` found: the entries that parsed, and every problem."""

    region: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)
    head: tuple[int, str] | None = None  # (seq, hash) of the last entry read

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, where: str, what: str) -> None:
        self.problems.append({"where": where, "what": what})


def _load_public(pem: str) -> Ed25519PublicKey | None:
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError):
        return None
    return key if isinstance(key, Ed25519PublicKey) else None


def _signature_ok(entry: dict[str, Any], public: Ed25519PublicKey) -> bool:
    # The signature object is outside what it signs: every field of it is checked exactly.
    sig = entry.get("signature")
    if not isinstance(sig, dict) or set(sig) != {"alg", "key_id", "value"}:
        return False
    if sig["alg"] != "ed25519" or sig["key_id"] != key_id(public):
        return False
    try:
        value = base64.b64decode(sig["value"], validate=True)
        if base64.b64encode(value).decode() != sig["value"]:
            return False  # non-canonical base64 (unused bits set)
        public.verify(value, canonical(entry))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(entry, dict) or encode(entry) != raw:
        return None
    return entry


def check_chain(
    region: str,
    items: list[tuple[str, bytes]],
    *,
    public: Ed25519PublicKey | None = None,
    head: tuple[int, str] | None = None,
) -> ChainReport:
    """Check a region's log, given as ``(key, stored bytes)`` in key order.

    ``public`` pins the signing key (default: the one in the genesis entry).
    ``head`` is a ``(seq, hash)`` known to have been written (the writer's
    local record, or an earlier report's): a log that ends before it, or
    holds another entry at that seq, has lost or changed entries.
    Never raises on bad content: every problem is in the report.
    """
    report = ChainReport(region)
    prev_hash, expect_seq = ZERO, 0
    for key, raw in items:
        where = key
        named = parse_key(key)
        entry = _parse(raw)
        if entry is None:
            report.problem(where, "not a canonical JSON entry (changed bytes)")
        else:
            if public is None and entry.get("seq") == 0 and entry.get("type") == GENESIS:
                public = _load_public(str(entry.get("data", {}).get("public_key", "")))
            _check_entry(report, where, entry, named, region, expect_seq, prev_hash, public)
            report.entries.append(entry)
        if named is not None and named[1] != expect_seq:
            what = f"entries {expect_seq}..{named[1] - 1} are missing (removed)"
            report.problem(where, what if named[1] > expect_seq else "duplicate or out of order")
        expect_seq = (named[1] if named else expect_seq) + 1
        prev_hash = digest(raw)
        report.head = (expect_seq - 1, prev_hash)
    if not items:
        report.problem(f"{PREFIX}{region}/", "the log is empty")
    _check_head(report, head)
    return report


def _check_entry(
    report: ChainReport,
    where: str,
    entry: dict[str, Any],
    named: tuple[str, int] | None,
    region: str,
    expect_seq: int,
    prev_hash: str,
    public: Ed25519PublicKey | None,
) -> None:
    if entry.get("format") != FORMAT:
        report.problem(where, f"format is {entry.get('format')!r}, expected {FORMAT!r}")
    if entry.get("region") != region or (named and named[0] != region):
        report.problem(where, f"entry of region {entry.get('region')!r} in {region!r}'s log")
    if named is None or entry.get("seq") != named[1]:
        report.problem(where, f"entry says seq {entry.get('seq')!r}: moved or reordered")
    if entry.get("prev") != prev_hash and (named is None or named[1] == expect_seq):
        report.problem(where, "prev does not match the hash of the entry before (chain broken)")
    if public is None:
        report.problem(where, "no public key to check the signature (genesis entry missing)")
    elif not _signature_ok(entry, public):
        report.problem(where, "signature does not match the entry")


def _check_head(report: ChainReport, head: tuple[int, str] | None) -> None:
    if head is None:
        return
    seq, want = head
    found = next((e for e in report.entries if e.get("seq") == seq), None)
    last = report.head[0] if report.head else -1
    if last < seq:
        report.problem(
            entry_key(report.region, seq),
            f"the log ends at seq {last} but entry {seq} was written (tail removed)",
        )
    elif found is not None and digest(encode(found)) != want:
        report.problem(entry_key(report.region, seq), "differs from the recorded head")
