"""Signed reports: any change to a signed report is detected."""

from __future__ import annotations

from pathlib import Path

import pytest

from replicators.errors import IntegrityError
from verifiers.report import (
    check,
    load_or_create_signing_key,
    load_public_key,
    sign,
    to_html,
    to_markdown,
)


def test_sign_check_and_tamper(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "report.key")
    assert (tmp_path / "report.key").stat().st_mode & 0o777 == 0o600
    public = load_public_key(tmp_path / "report.key.pub")
    report = sign(
        {
            "kind": "objects",
            "stream": "s",
            "ok": True,
            "roots": {"source": "ab"},
            "differences": [],
        },
        key,
    )
    check(report, public)
    for field, value in (("ok", False), ("roots", {"source": "ac"}), ("extra", 1)):
        with pytest.raises(IntegrityError):
            check({**report, field: value}, public)
    other = load_or_create_signing_key(tmp_path / "other.key")
    with pytest.raises(IntegrityError, match="another key"):
        check(report, other.public_key())
    with pytest.raises(IntegrityError, match="not signed"):
        check({k: v for k, v in report.items() if k != "signature"}, public)
    # the same key file is read back, not replaced
    again = load_or_create_signing_key(tmp_path / "report.key")
    check(sign({"x": 1}, again), public)


def test_renderings_name_verdict_and_differences(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "k")
    report = sign(
        {
            "kind": "postgres",
            "stream": "pg",
            "ok": False,
            "summary": "1 range differs",
            "differences": [{"what": "rows differ", "where": "runs.id in [100, 200)"}],
        },
        key,
    )
    md = to_markdown(report)
    assert "**FAIL**" in md and "runs.id in [100, 200)" in md and "ed25519:" in md
    assert "&lt;" not in md
    assert "runs.id in [100, 200)" in to_html(report)
