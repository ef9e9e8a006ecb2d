"""An objects stream among three regions: ``buckets`` names every region's copy, and the
stream follows the roles (the active region's bucket is the source, each passive region
applies into its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from replicators.objects.options import ObjectsOptions


def bucket(tmp_path: Path, region: str) -> dict[str, Any]:
    (tmp_path / "secret").write_text("x")
    secret = f"file:{tmp_path / 'secret'}"
    return {
        "endpoint": f"http://s3-{region}:8333",
        "bucket": "data",
        "access_key": secret,
        "secret_key": secret,
    }


def test_three_regions_copy_from_the_active_bucket_to_each_passive_one(tmp_path: Path) -> None:
    buckets = {r: bucket(tmp_path, r) for r in ("a", "b", "c")}
    filer = {"filer": "127.0.0.1:8888.18888"}
    opts = ObjectsOptions.model_validate(
        {"buckets": buckets, "source_region": "a", "events": "filer", "filers": {"a": filer}}
    )
    assert opts.source.endpoint == "http://s3-a:8333"  # defaults from buckets
    assert opts.mirror.endpoint == "http://s3-b:8333"
    a_to_c = opts.between("a", "c")
    assert (a_to_c.source.endpoint, a_to_c.mirror.endpoint) == (
        "http://s3-a:8333",
        "http://s3-c:8333",
    )
    assert a_to_c.events == "filer" and a_to_c.filer is not None
    # after b takes over: b ships from its bucket; c applies into its own, a too when back
    b_to_c, b_to_a = opts.between("b", "c"), opts.between("b", "a")
    assert (b_to_c.source.endpoint, b_to_c.mirror.endpoint) == (
        "http://s3-b:8333",
        "http://s3-c:8333",
    )
    assert b_to_a.mirror.endpoint == "http://s3-a:8333"
    assert b_to_c.events == "none"  # b has no filer configured: it scans
    assert b_to_c.source_region == "b"


def test_two_regions_keep_their_orientation(tmp_path: Path) -> None:
    opts = ObjectsOptions.model_validate(
        {"source": bucket(tmp_path, "a"), "mirror": bucket(tmp_path, "b"), "source_region": "a"}
    )
    assert opts.between("a", "b") is opts
    assert opts.between("b", "a").source.endpoint == "http://s3-b:8333"


def test_buckets_need_the_source_region_among_two_or_more(tmp_path: Path) -> None:
    for table in (
        {"buckets": {"a": bucket(tmp_path, "a")}, "source_region": "a"},
        {"buckets": {"a": bucket(tmp_path, "a"), "b": bucket(tmp_path, "b")}},
    ):
        with pytest.raises(ValidationError, match="source_region among them"):
            ObjectsOptions.model_validate(table)
