"""Signed verification reports: one format for every verifier (JSON, Markdown, HTML).

A report is a JSON object; ``sign`` adds ``signature`` = Ed25519 over the
canonical JSON of everything else (sorted keys, no spaces, UTF-8), with the
signer's public key id. ``check`` recomputes it. Anyone holding the public
key (``dragent`` writes it next to the private key as ``<file>.pub``) can
check a report; only the region's agent can produce one.

Report fields every verifier fills: ``kind`` (what was verified), ``stream``,
``region``, ``started_at`` / ``finished_at`` (unix seconds), ``at`` (the LSN,
time or listing the comparison refers to), ``ok`` (bool), ``summary`` (one
sentence), ``roots`` ({side: hex root}), ``counts`` ({side: n}),
``differences`` (list of objects, each with at least ``what`` and ``where``).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from replicators.errors import IntegrityError, KeyAccessError

FORMAT = "dragent-report/1"


def canonical(report: dict[str, Any]) -> bytes:
    body = {k: v for k, v in report.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read the region's report-signing key, creating it (mode 0600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        pub = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        path.with_name(path.name + ".pub").write_bytes(pub)
        return key
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise KeyAccessError(f"cannot read report signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyAccessError(f"{path}: not an Ed25519 private key")
    return key


def sign(report: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """Return a copy of ``report`` with ``format`` and an Ed25519 ``signature``."""
    body = {**report, "format": FORMAT}
    body.pop("signature", None)
    sig = key.sign(canonical(body))
    body["signature"] = {
        "alg": "ed25519",
        "key_id": key_id(key.public_key()),
        "value": base64.b64encode(sig).decode(),
    }
    return body


def check(report: dict[str, Any], public: Ed25519PublicKey) -> None:
    """Raise ``IntegrityError`` unless ``report`` carries a valid signature by ``public``."""
    sig = report.get("signature")
    if not isinstance(sig, dict) or sig.get("alg") != "ed25519":
        raise IntegrityError("report is not signed", where="report")
    if sig.get("key_id") != key_id(public):
        raise IntegrityError(f"report signed by another key ({sig.get('key_id')})", where="report")
    try:
        public.verify(base64.b64decode(sig["value"]), canonical(report))
    except (InvalidSignature, ValueError, KeyError):
        raise IntegrityError(
            "report signature does not match its content", where="report"
        ) from None


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise KeyAccessError(f"{path}: not an Ed25519 public key")
    return key


def to_markdown(report: dict[str, Any]) -> str:
    verdict = "PASS" if report.get("ok") else "FAIL"
    lines = [
        f"# Verification report: {report.get('kind', '?')} / {report.get('stream', '?')}",
        "",
        f"**{verdict}** — {report.get('summary', '')}",
        "",
        f"- region: {report.get('region', '?')}",
        f"- compared at: {report.get('at', '?')}",
        f"- started: {report.get('started_at')} finished: {report.get('finished_at')}",
    ]
    for side, root in (report.get("roots") or {}).items():
        count = (report.get("counts") or {}).get(side, "?")
        lines.append(f"- {side}: root `{root}`, {count} items")
    diffs = report.get("differences") or []
    lines += ["", f"## Differences ({len(diffs)})", ""]
    lines += [f"- {d.get('what', '?')} at `{d.get('where', '?')}`" for d in diffs] or ["none"]
    sig = report.get("signature") or {}
    lines += ["", f"Signed {sig.get('alg', 'no')} by {sig.get('key_id', '-')}.", ""]
    return "\n".join(lines)


def to_html(report: dict[str, Any]) -> str:
    md = html.escape(to_markdown(report))
    title = html.escape(f"{report.get('kind', '?')} / {report.get('stream', '?')}")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>dragent verification: {title}</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto}"
        "pre{white-space:pre-wrap}</style></head>"
        f"<body><pre>{md}</pre></body></html>"
    )
