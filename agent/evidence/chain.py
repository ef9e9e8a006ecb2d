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
public key that signs the chain (a ``--public-key`` given by the auditor
overrides it). The key changes only by a ``signing-key.change`` entry signed
by the current key, whose data names the next one (``public_key``, ``key_id``):
every entry after it must be signed by that key (``Signer``, ``follow``).
``check_chain`` finds a changed byte (not canonical, bad signature, or a
broken ``prev``), an entry signed by a key the chain did not introduce, a
removed entry (a gap in ``seq``, or a tail shorter than a known head) and a
reordered one (``seq`` not the one its name says, ``prev`` mismatch).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from replicators.errors import DragentError
from verifiers.report import canonical, key_id

FORMAT = "dragent-evidence/1"
GENESIS = "evidence.genesis"
KEY_CHANGE = "signing-key.change"
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


def key_change_data(
    old: Ed25519PublicKey, new: Ed25519PublicKey, reason: str = ""
) -> dict[str, Any]:
    """The data of a ``signing-key.change`` entry (to be signed by ``old``) naming ``new``."""
    pem = new.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    data = {"public_key": pem, "key_id": key_id(new), "previous_key_id": key_id(old)}
    return data | ({"reason": reason} if reason else {})


class SigningKeyError(DragentError):
    """This writer's key is not the key that signs the chain now: it must not append."""


@dataclass(frozen=True)
class Signer:
    """The key that must sign the next entry of a chain.

    ``since`` is the seq of the entry that named it (0 for the genesis entry,
    or a ``signing-key.change``; -1 when pinned before any entry was read);
    ``seq`` is the last entry taken into account (-1: none). ``claimed`` is the
    key id the genesis entry says it was signed with, kept for a genesis that
    names no key (then only a pinned key verifies the chain, and a writer may
    continue it with the key of that id).
    """

    public: Ed25519PublicKey | None = None
    since: int = -1
    seq: int = -1
    claimed: str | None = None

    @property
    def key_id(self) -> str | None:
        return self.claimed if self.public is None else key_id(self.public)

    def describe(self) -> str:
        if self.public is None:
            if self.claimed:
                return f"{self.claimed} (the genesis entry's signer; it names no key)"
            return "no key (the chain has no genesis entry naming one)"
        named = f"named by entry {self.since}" if self.since >= 0 else "pinned"
        return f"{self.key_id} ({named})"


@dataclass
class ChainReport:
    """What ``check_chain`` found: the entries that parsed, and every problem."""

    region: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)
    head: tuple[int, str] | None = None  # (seq, hash) of the last entry read
    signer: Signer = field(default_factory=Signer)  # the key for the entry after the last

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

    ``public`` pins the key the chain starts with (default: the one the genesis
    entry names); ``signing-key.change`` entries signed by the key of their
    time hand over to the next (``report.signer``: the key after the last entry).
    ``head`` is a ``(seq, hash)`` known to have been written (the writer's
    local record, or an earlier report's): a log that ends before it, or
    holds another entry at that seq, has lost or changed entries.
    Never raises on bad content: every problem is in the report.
    """
    report = ChainReport(region)
    signer = Signer() if public is None else Signer(public)
    prev_hash, expect_seq = ZERO, 0
    for key, raw in items:
        where = key
        named = parse_key(key)
        seq = named[1] if named else expect_seq
        entry = _parse(raw)
        if entry is None:
            report.problem(where, "not a canonical JSON entry (changed bytes)")
            signer = replace(signer, seq=seq)
        else:
            _check_entry(report, where, entry, named, region, expect_seq, prev_hash)
            signer, what = advance(signer, entry, seq)
            if what:
                report.problem(where, what)
            report.entries.append(entry)
        if named is not None and named[1] != expect_seq:
            what = f"entries {expect_seq}..{named[1] - 1} are missing (removed)"
            report.problem(where, what if named[1] > expect_seq else "duplicate or out of order")
        expect_seq = seq + 1
        prev_hash = digest(raw)
        report.head = (expect_seq - 1, prev_hash)
    report.signer = signer
    if not items:
        report.problem(f"{PREFIX}{region}/", "the log is empty")
    _check_head(report, head)
    return report


def advance(signer: Signer, entry: dict[str, Any], seq: int) -> tuple[Signer, str]:
    """Take ``entry`` (stored at ``seq``) into account: the signer of the entry after it,
    and what is wrong with its signature or key change ("" if nothing).

    Entry 0 of type genesis names the first key, unless one is pinned. A
    ``signing-key.change`` whose signature holds under the current key names the
    next key; any other entry leaves the key as it is (a bad one is a problem, never
    a way to change the key).
    """
    if signer.public is None and entry.get("seq") == 0 and entry.get("type") == GENESIS:
        data = entry.get("data")
        pem = data.get("public_key") if isinstance(data, dict) else None
        sig = entry.get("signature")
        claimed = sig.get("key_id") if isinstance(sig, dict) else None
        signer = Signer(_load_public(str(pem or "")), since=0, claimed=str(claimed or "") or None)
    signer = replace(signer, seq=seq)
    if signer.public is None:
        return signer, "no public key to check the signature (genesis entry missing)"
    if not _signature_ok(entry, signer.public):
        return signer, _signature_problem(entry, signer)
    if entry.get("type") != KEY_CHANGE:
        return signer, ""
    new = _introduced(entry)
    if new is None:
        return signer, f"{KEY_CHANGE} does not name a valid Ed25519 key (public_key, key_id)"
    return Signer(new, since=seq, seq=seq), ""


def follow(items: list[tuple[str, bytes]], signer: Signer | None = None) -> Signer:
    """The signer after ``items`` (``(key, bytes)`` in key order, following ``signer``'s
    ``seq``, or from entry 0), as ``check_chain`` would find it. Only the genesis and
    key-change entries are checked, so this is cheap enough for every writer."""
    signer = signer or Signer()
    for key, raw in items:
        named = parse_key(key)
        seq = named[1] if named else signer.seq + 1
        entry = _parse(raw)
        if entry is not None and (entry.get("type") == KEY_CHANGE or signer.public is None):
            signer, _ = advance(signer, entry, seq)
        else:
            signer = replace(signer, seq=seq)
    return signer


def _introduced(entry: dict[str, Any]) -> Ed25519PublicKey | None:
    data = entry.get("data")
    if not isinstance(data, dict):
        return None
    new = _load_public(str(data.get("public_key", "")))
    return new if new is not None and data.get("key_id") == key_id(new) else None


def _signature_problem(entry: dict[str, Any], signer: Signer) -> str:
    sig = entry.get("signature")
    claimed = sig.get("key_id") if isinstance(sig, dict) else None
    if isinstance(claimed, str) and claimed != signer.key_id:
        return (
            f"signed by key {claimed}, but the chain's key here is {signer.describe()}; "
            f"a new key must be introduced by a {KEY_CHANGE} entry signed by the current one"
        )
    return "signature does not match the entry"


def _check_entry(
    report: ChainReport,
    where: str,
    entry: dict[str, Any],
    named: tuple[str, int] | None,
    region: str,
    expect_seq: int,
    prev_hash: str,
) -> None:
    if entry.get("format") != FORMAT:
        report.problem(where, f"format is {entry.get('format')!r}, expected {FORMAT!r}")
    if entry.get("region") != region or (named and named[0] != region):
        report.problem(where, f"entry of region {entry.get('region')!r} in {region!r}'s log")
    if named is None or entry.get("seq") != named[1]:
        report.problem(where, f"entry says seq {entry.get('seq')!r}: moved or reordered")
    if entry.get("prev") != prev_hash and (named is None or named[1] == expect_seq):
        report.problem(where, "prev does not match the hash of the entry before (chain broken)")


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
