"""S3 Inventory reports (replicators/objects/inventory.py): manifests of gzip CSV and Parquet
files in AWS's documented format, read from local disk and from a real SeaweedFS bucket, and
used as the listing of a mirror tree's full rebuild."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import pytest_asyncio

from agent.config import AgentConfig
from agent.lab import Lab
from replicators.errors import IntegrityError
from replicators.objects.inventory import (
    InventoryObject,
    bucket_getter,
    directory_getter,
    parse_manifest,
    read_inventory,
)
from replicators.objects.trees import TreeStore
from tests.test_objects_rig import Rig, options
from verifiers.objects import copy_object, rebuild_mirror_tree

CSV_SCHEMA = (
    "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, "
    "StorageClass, IsMultipartUploaded"
)
PARQUET_SCHEMA = (
    "message s3.inventory { required binary bucket (UTF8); required binary key (UTF8);"
    " optional binary version_id (UTF8); optional boolean is_latest;"
    " optional boolean is_delete_marker; optional int64 size;"
    " optional int64 last_modified_date (TIMESTAMP_MILLIS); optional binary e_tag (UTF8);"
    " optional binary storage_class (UTF8); optional boolean is_multipart_uploaded;}"
)
WHEN = datetime(2026, 11, 6, 21, 32, tzinfo=UTC)
WHEN_NS = int(WHEN.timestamp()) * 1_000_000_000

# (key, size, etag, is_latest, is_delete_marker)
ROWS = [
    ("p/a.txt", 10, "e1", True, False),
    ("p/with space+plus.txt", 20, "e2", True, False),
    ("p/old", 5, "e0", False, False),  # a non-current version
    ("p/deleted", 0, "", True, True),  # a delete marker
    ("q/outside", 7, "e3", True, False),  # outside the prefix
    ("p/ünïcode/b", 30, "e4", True, False),
]


def _csv_gz(rows: list[tuple[str, int, str, bool, bool]]) -> bytes:
    text = io.StringIO()
    w = csv.writer(text, quoting=csv.QUOTE_ALL)
    for key, size, etag, latest, marker in rows:
        quoted = quote_plus(key, safe="/")  # as the CSV reports encode keys
        w.writerow(
            ["data", quoted, "v1", str(latest).lower(), str(marker).lower(),
             "" if marker else size, WHEN.strftime("%Y-%m-%dT%H:%M:%S.000Z"), etag,
             "STANDARD", "false"]
        )  # fmt: skip
    return gzip.compress(text.getvalue().encode())


def _parquet(rows: list[tuple[str, int, str, bool, bool]]) -> bytes:
    table = pa.table(
        {
            "bucket": ["data"] * len(rows),
            "key": [r[0] for r in rows],
            "version_id": ["v1"] * len(rows),
            "is_latest": [r[3] for r in rows],
            "is_delete_marker": [r[4] for r in rows],
            "size": pa.array([None if r[4] else r[1] for r in rows], pa.int64()),
            "last_modified_date": pa.array([WHEN] * len(rows), pa.timestamp("ms", tz="UTC")),
            "e_tag": [r[2] for r in rows],
            "storage_class": ["STANDARD"] * len(rows),
            "is_multipart_uploaded": [False] * len(rows),
        }
    )
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def _report(fmt: str, files: list[bytes], base: str) -> dict[str, bytes]:
    """key → bytes of a whole report in the destination bucket (manifest + data files)."""
    ext = "csv.gz" if fmt == "CSV" else "parquet"
    out, listed = {}, []
    for i, data in enumerate(files):
        key = f"{base}/data/file-{i}.{ext}"
        out[key] = data
        listed.append({"key": key, "size": len(data), "MD5checksum": hashlib.md5(data).hexdigest()})
    manifest = {
        "sourceBucket": "data",
        "destinationBucket": "arn:aws:s3:::inventory",
        "version": "2016-11-30",
        "creationTimestamp": "1794000000000",
        "fileFormat": fmt,
        "fileSchema": CSV_SCHEMA if fmt == "CSV" else PARQUET_SCHEMA,
        "files": listed,
    }
    out[f"{base}/2026-11-06T21-32Z/manifest.json"] = json.dumps(manifest).encode()
    return out


def _write(root: Path, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)


EXPECTED = [
    InventoryObject("a.txt", 10, "e1", WHEN_NS),
    InventoryObject("with space+plus.txt", 20, "e2", WHEN_NS),
    InventoryObject("ünïcode/b", 30, "e4", WHEN_NS),
]


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
async def test_reads_a_report_from_local_disk(tmp_path: Path, fmt: str) -> None:
    make = _csv_gz if fmt == "CSV" else _parquet
    files = _report(fmt, [make(ROWS[:3]), make(ROWS[3:])], "inv/data/cfg")
    _write(tmp_path, files)
    manifest = "inv/data/cfg/2026-11-06T21-32Z/manifest.json"
    pages = [p async for p in read_inventory(directory_getter(tmp_path), manifest, prefix="p/")]
    assert [o for p in pages for o in p] == EXPECTED
    small = [p async for p in read_inventory(directory_getter(tmp_path), manifest, page=2)]
    assert [len(p) for p in small] == [2, 2]  # q/outside is in: no prefix


async def test_a_damaged_file_or_an_orc_report_is_refused(tmp_path: Path) -> None:
    files = _report("CSV", [_csv_gz(ROWS)], "inv")
    key = next(k for k in files if k.endswith(".csv.gz"))
    files[key] = _csv_gz(ROWS[:2])  # not what the manifest's MD5 says
    _write(tmp_path, files)
    with pytest.raises(IntegrityError, match="MD5"):
        async for _ in read_inventory(
            directory_getter(tmp_path), next(k for k in files if k.endswith("json"))
        ):
            pass
    orc = json.loads(files[next(k for k in files if k.endswith("json"))])
    orc["fileFormat"] = "ORC"
    assert parse_manifest(json.dumps(orc).encode()).file_format == "ORC"
    (tmp_path / "orc.json").write_bytes(json.dumps(orc).encode())
    with pytest.raises(ValueError, match="ORC"):
        async for _ in read_inventory(directory_getter(tmp_path), "orc.json"):
            pass
    with pytest.raises(ValueError):
        parse_manifest(b'{"fileFormat": "CSV"}')


@pytest_asyncio.fixture(loop_scope="session")
async def rig(
    lab: Lab, cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> AsyncIterator[Rig]:
    yield Rig(unique, options(lab, f"{unique}/"), cfg_a, cfg_b, tmp_path)


@pytest.mark.lab
@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
async def test_an_inventory_in_a_bucket_is_the_listing_of_a_mirror_tree_rebuild(
    rig: Rig, tmp_path: Path, fmt: str
) -> None:
    src, dst = await rig.source_bucket(), await rig.mirror_bucket()
    try:
        keys = [f"inv-{fmt}/{i:02d}" for i in range(6)]
        for key in keys:
            await src.write(key, os.urandom(300), "text/plain", {})
            await copy_object(src, dst, key, int(rig.opts.part_size))
        listing = [o for page in [p async for p in dst.scan()] for o in page]
        rows = [(o.key, o.size, o.etag, True, False) for o in listing]
        rows.append(("gone-since", 1, "zz", True, False))  # listed, deleted since: left out
        make = _csv_gz if fmt == "CSV" else _parquet
        # the report lives in the mirror bucket under reports/ (keys relative to the prefix)
        report = _report(fmt, [make(rows[:3]), make(rows[3:])], f"reports/{fmt}")
        for key, data in report.items():
            await dst.write(key, data, "application/octet-stream", {})
        manifest = next(k for k in report if k.endswith("manifest.json"))
        tree = TreeStore(tmp_path / "mirror-tree.sqlite")
        reference = TreeStore(tmp_path / "by-listing.sqlite")
        await rebuild_mirror_tree(reference, dst)
        inv = read_inventory(bucket_getter(dst), manifest, prefix=f"inv-{fmt}/")
        got = await rebuild_mirror_tree(tree, dst, _prefixed(inv, f"inv-{fmt}/"))
        assert got["keys"] == 6 and tree.info()["built_from"] == "inventory"
        assert all(tree.get(k) == reference.get(k) for k in keys)
        tree.close()
        reference.close()
    finally:
        await src.aclose()
        await dst.aclose()


async def _prefixed(
    pages: AsyncIterator[list[InventoryObject]], prefix: str
) -> AsyncIterator[list[InventoryObject]]:
    """Keys back to the bucket's (the rig's prefix) form: the reader strips ``prefix``."""
    async for page in pages:
        yield [InventoryObject(prefix + o.key, o.size, o.etag, o.time_ns) for o in page]
