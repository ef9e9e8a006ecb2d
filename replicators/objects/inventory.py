"""S3 Inventory reports as the listing of a very large bucket (CSV and Parquet).

An inventory report is a ``manifest.json`` in the destination bucket (AWS's documented
layout: ``destination-prefix/source-bucket/config-ID/YYYY-MM-DDTHH-MMZ/manifest.json``)::

    {"sourceBucket": "data", "destinationBucket": "arn:aws:s3:::inventory",
     "version": "2016-11-30", "creationTimestamp": "1514944800000",
     "fileFormat": "CSV",
     "fileSchema": "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size,
                    LastModifiedDate, ETag, ...",
     "files": [{"key": ".../data/<uuid>.csv.gz", "size": 1234, "MD5checksum": "..."}]}

- CSV files are gzip-compressed, without a header; columns in ``fileSchema`` order; the
  object key is URL-encoded (``+`` for a space, as in a form); ``LastModifiedDate`` is ISO
  8601 (``2016-11-06T21:32:00.000Z``).
- Parquet files have named columns (``bucket``, ``key``, ``version_id``, ``is_latest``,
  ``is_delete_marker``, ``size``, ``last_modified_date`` as a timestamp, ``e_tag``); keys
  are not encoded; ``fileSchema`` is the Parquet message schema. Read with ``pyarrow``,
  one record batch at a time.
- ORC is not read (``ValueError``).

With versions included, only the latest version of a key counts and a delete marker
means the key is absent. Each data file is checked against its ``MD5checksum`` before
its rows are used. Memory: one compressed data file plus one page of rows.

``read_inventory(get, manifest_key)`` takes ``get(key) -> bytes`` over the destination
bucket (``bucket_getter`` for a ``replicators.s3.S3Store``, ``directory_getter`` for a
copy on local disk) and yields pages of ``InventoryObject`` (key, size, etag, time_ns),
like ``Bucket.scan``: usable wherever a listing is (``verifiers.objects.rebuild_mirror_tree``).
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from replicators.errors import IntegrityError

Getter = Callable[[str], Awaitable[bytes]]
PAGE = 1000


@dataclass(frozen=True, slots=True)
class InventoryObject:
    key: str
    size: int
    etag: str
    time_ns: int


@dataclass(frozen=True, slots=True)
class InventoryFile:
    key: str
    size: int
    md5: str


@dataclass(frozen=True, slots=True)
class Manifest:
    source_bucket: str
    file_format: str
    """``CSV``, ``Parquet`` or ``ORC``."""
    file_schema: str
    files: tuple[InventoryFile, ...]
    created_ms: int

    @property
    def columns(self) -> list[str]:
        """CSV column names, in order (``fileSchema`` of a CSV report)."""
        return [c.strip() for c in self.file_schema.split(",")]


def parse_manifest(data: bytes) -> Manifest:
    """Parse ``manifest.json``; raises ``ValueError`` naming what is missing or malformed."""
    try:
        d = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"inventory manifest is not JSON: {exc}") from None
    if not isinstance(d, dict):
        raise ValueError("inventory manifest is not a JSON object")
    fmt, schema, files = d.get("fileFormat"), d.get("fileSchema"), d.get("files")
    if fmt not in ("CSV", "Parquet", "ORC"):
        raise ValueError(f"inventory manifest: unknown fileFormat {fmt!r:.40}")
    if not isinstance(schema, str) or not isinstance(files, list):
        raise ValueError("inventory manifest: fileSchema and files are required")
    out = []
    for f in files:
        if not (isinstance(f, dict) and isinstance(f.get("key"), str)):
            raise ValueError("inventory manifest: a file without a key")
        out.append(InventoryFile(f["key"], int(f.get("size", 0)), str(f.get("MD5checksum", ""))))
    created = d.get("creationTimestamp", "0")
    return Manifest(
        str(d.get("sourceBucket", "")),
        fmt,
        schema,
        tuple(out),
        int(created) if str(created).isdigit() else 0,
    )


def _ns(text: str) -> int:
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(when.timestamp() * 1_000_000) * 1000


def _true(value: Any) -> bool:
    return value is True or str(value).strip().lower() == "true"


def csv_rows(data: bytes, columns: list[str]) -> Iterator[InventoryObject]:
    """The current objects in one gzip CSV data file (``columns``: the manifest's schema)."""
    col = {name: i for i, name in enumerate(columns)}
    if "Key" not in col or "Size" not in col:
        raise ValueError("inventory CSV schema lacks Key or Size")
    i_key, i_size = col["Key"], col["Size"]
    i_etag, i_time = col.get("ETag"), col.get("LastModifiedDate")
    i_latest, i_marker = col.get("IsLatest"), col.get("IsDeleteMarker")
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as raw:
        for row in csv.reader(io.TextIOWrapper(raw, encoding="utf-8", newline="")):
            if not row:
                continue
            if i_latest is not None and row[i_latest] and not _true(row[i_latest]):
                continue
            if i_marker is not None and _true(row[i_marker]):
                continue
            yield InventoryObject(
                unquote_plus(row[i_key]),
                int(row[i_size] or 0),
                row[i_etag].strip('"') if i_etag is not None else "",
                _ns(row[i_time]) if i_time is not None and row[i_time] else 0,
            )


def parquet_rows(data: bytes, batch: int = PAGE) -> Iterator[InventoryObject]:
    """The current objects in one Parquet data file, a record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(io.BytesIO(data))
    names = set(pf.schema_arrow.names)
    if not {"key", "size"} <= names:
        raise ValueError("inventory Parquet file lacks key or size")
    wanted = [
        c
        for c in ("key", "size", "e_tag", "last_modified_date", "is_latest", "is_delete_marker")
        if c in names
    ]
    for rb in pf.iter_batches(batch_size=batch, columns=wanted):
        cols = {name: rb.column(i) for i, name in enumerate(rb.schema.names)}
        times = cols.get("last_modified_date")
        if times is not None and pa.types.is_timestamp(times.type):
            times = times.cast(pa.timestamp("ns")).cast(pa.int64())
        keys, sizes = cols["key"].to_pylist(), cols["size"].to_pylist()
        etags = cols["e_tag"].to_pylist() if "e_tag" in cols else [""] * len(keys)
        stamps = times.to_pylist() if times is not None else [0] * len(keys)
        latest = cols["is_latest"].to_pylist() if "is_latest" in cols else [None] * len(keys)
        marker = (
            cols["is_delete_marker"].to_pylist()
            if "is_delete_marker" in cols
            else [None] * len(keys)
        )
        for key, size, etag, stamp, is_latest, is_marker in zip(
            keys, sizes, etags, stamps, latest, marker, strict=True
        ):
            if is_latest is False or is_marker is True:
                continue
            yield InventoryObject(key, int(size or 0), (etag or "").strip('"'), int(stamp or 0))


async def read_inventory(
    get: Getter, manifest_key: str, *, prefix: str = "", page: int = PAGE
) -> AsyncIterator[list[InventoryObject]]:
    """Pages (≤ ``page``) of the objects an inventory report lists under ``prefix``, keys
    relative to it. Raises ``IntegrityError`` when a data file does not match its MD5,
    ``ValueError`` for a malformed manifest or an ORC report."""
    manifest = parse_manifest(await get(manifest_key))
    if manifest.file_format == "ORC":
        raise ValueError("ORC inventory reports are not read: choose CSV or Parquet")
    out: list[InventoryObject] = []
    for f in manifest.files:
        data = await get(f.key)
        if f.md5 and hashlib.md5(data, usedforsecurity=False).hexdigest() != f.md5:
            raise IntegrityError(f"inventory file {f.key}: MD5 differs from the manifest's")
        rows = (
            csv_rows(data, manifest.columns)
            if manifest.file_format == "CSV"
            else parquet_rows(data, page)
        )
        for obj in rows:
            if not obj.key.startswith(prefix):
                continue
            if prefix:
                obj = InventoryObject(obj.key[len(prefix) :], obj.size, obj.etag, obj.time_ns)
            out.append(obj)
            if len(out) >= page:
                yield out
                out = []
        del data
    if out:
        yield out


def directory_getter(root: Path) -> Getter:
    """``get`` over a copy of the destination bucket on local disk (keys as relative paths)."""

    top = root.resolve()

    def read(key: str) -> bytes:
        path = (top / key).resolve()
        if not path.is_relative_to(top):
            raise ValueError(f"inventory key {key!r} leaves {root}")
        return path.read_bytes()

    async def get(key: str) -> bytes:
        return await asyncio.to_thread(read, key)

    return get


def bucket_getter(store: Any) -> Getter:
    """``get`` over a ``replicators.bucket.Bucket`` opened on the destination bucket."""

    async def get(key: str) -> bytes:
        return bytes(await store.read(key, ""))

    return get
