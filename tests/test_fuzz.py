"""Fuzzing every decoder of bytes that come from another region, a store or a sender.

Random bytes and mutations of valid encodings (a flipped byte, a cut, bytes added, a
slice replaced; for JSON formats, a field replaced by any JSON value, removed or added)
must end in the decoder's own error, promptly and in bounded memory:

- from the vault (segments, a segment's WAL records as the spool decodes them, object
  records, artifact manifests, base-backup manifests, synthetic records):
  ``IntegrityError`` only, so the stream halts instead of retrying forever
  (``agent.supervise`` retries anything else);
- ``lsn.unpack_record`` on its own, and notifications (S3 events, filer events, the filer's
  output stream): ``ValueError``.

The targets are checked too: records that decode but disagree with each other (the parts
of one upload) or cannot be written (a path that is a file and a directory) halt the
objects and artifacts targets with ``IntegrityError``.

Each example must finish within ``DEADLINE``; example counts keep the file to seconds.
The last test is the positive control: a valid segment still opens after the fuzzing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import socket
import struct
import tracemalloc
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import xxhash
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from replicators import segment
from replicators.artifacts import manifest as am
from replicators.errors import IntegrityError
from replicators.objects import records as rec
from replicators.objects.events import JsonStream, filer_hints, s3_event_hints
from replicators.postgres import lsn as L
from replicators.postgres.basebackup import BackupManifest
from replicators.postgres.spool import decode_records
from replicators.segment import DataKey, SegmentHeader, open_segment, read_header, seal
from replicators.synthetic import make_record, parse_record
from verifiers.merkle import leaf_hash, merkle_root

DEADLINE = timedelta(seconds=2)  # every decoder takes well under 10 ms per example
EXAMPLES = int(os.environ.get("DRAGENT_FUZZ_EXAMPLES", "300"))
"""Examples per fuzz test; raise it for a longer hunt (``DRAGENT_FUZZ_EXAMPLES=5000``)."""
FUZZ = settings(
    max_examples=EXAMPLES, deadline=DEADLINE, suppress_health_check=[HealthCheck.too_slow]
)
FEW = settings(
    max_examples=max(1, EXAMPLES // 3),
    deadline=DEADLINE,
    suppress_health_check=[HealthCheck.too_slow],
)

# --- mutation strategies ----------------------------------------------------------------------


@st.composite
def mutants(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` after one to three byte-level mutations."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "cut", "extend", "splice", "insert", "duplicate"]))
        n = len(data)
        i = draw(st.integers(0, n))
        j = draw(st.integers(i, min(n, i + 64)))
        if op == "flip" and i < n:
            data[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[i:]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "splice":
            data[i:j] = draw(st.binary(max_size=64))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[i:i] = data[i:j]
    return bytes(data)


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 2**64, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["\ud800", "", "0/1", "1.2", "../x", "a/b", "x\n", "١.٢", "²"])
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def json_mutants(draw: st.DrawFn, base: Any) -> Any:
    """``base`` (a JSON document) with one to three values replaced, removed or added."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        if not path:
            doc = draw(JSON_VALUES)
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "replace", "remove", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(JSON_VALUES)
        elif action == "remove":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=4))] = draw(JSON_VALUES)
        else:
            parent.append(draw(JSON_VALUES))
    return doc


def dumps(doc: Any) -> bytes:
    """JSON as a writer that escapes everything would send it (NaN, Infinity, lone
    surrogates as ``\\ud800`` included: Python's parser takes them all)."""
    return json.dumps(doc).encode()


DEEP = [b"[" * 100_000, b'{"a":' * 50_000, b"[" * 100_000 + b"]" * 100_000]
"""Nesting deep enough for RecursionError in the JSON parser."""


def only(errors: tuple[type[BaseException], ...], call: Any, *args: Any) -> Any:
    """``call(*args)``'s result, or None if it raised one of ``errors`` (anything else
    fails the test)."""
    try:
        return call(*args)
    except errors:
        return None


# --- segments ---------------------------------------------------------------------------------

KEY = DataKey("k-fuzz", bytes(range(32)), b"wrapped")
STREAM, EPOCH, SEQ = "fuzz", 2, 9
RECORDS = [b"", b"a" * 300, os.urandom(100), b"tail record " * 20]


def make(records: list[bytes], frame_size: int = 64) -> bytes:
    return seal(
        records, stream=STREAM, epoch=EPOCH, seq=SEQ, start="0", end=str(len(records)),
        first_source_time=1.0, last_source_time=2.0, data_key=KEY, created_at=3.0,
        frame_size=frame_size,
    )  # fmt: skip


VALID = make(RECORDS)
HEADER_LEN = struct.unpack_from(">H", VALID, 10)[0]


def open_valid(blob: bytes) -> segment.OpenedSegment | None:
    """Open ``blob`` as the fuzz segment; None on ``IntegrityError`` (nothing else allowed)."""
    return only(
        (IntegrityError,),
        lambda: open_segment(
            blob, KEY.plaintext, expect_stream=STREAM, expect_epoch=EPOCH, expect_seq=SEQ
        ),
    )


@FUZZ
@given(st.binary(max_size=600) | st.binary(max_size=600).map(lambda b: segment.MAGIC + b))
def test_segment_random_bytes(blob: bytes) -> None:
    only((IntegrityError,), read_header, blob)
    assert open_valid(blob) is None


@FUZZ
@given(mutants(VALID))
def test_segment_mutants_are_rejected_or_unchanged(blob: bytes) -> None:
    opened = open_valid(blob)
    if opened is not None:  # only a mutation that changed nothing can open
        assert blob == VALID and opened.records == RECORDS


@st.composite
def header_mutants(draw: st.DrawFn) -> bytes:
    """A mutant of the header with its checksum made right again, so the fields are parsed
    (lengths, algorithm ids, frame size, UTF-8), and the rest of the segment after it."""
    body = draw(mutants(VALID[: HEADER_LEN - segment.CHECKSUM_SIZE]))
    if len(body) >= 12 and draw(st.booleans()):  # make header_len agree with the mutant
        body = body[:10] + struct.pack(">H", len(body) + 16) + body[12:]
    return body + xxhash.xxh3_128_digest(body) + VALID[HEADER_LEN:]


@FUZZ
@given(header_mutants())
def test_segment_header_fields_fuzzed_past_the_checksum(blob: bytes) -> None:
    only((IntegrityError,), read_header, blob)
    assert open_valid(blob) is None or blob == VALID


def forge(
    chunks: list[bytes],
    flags: list[int],
    *,
    frame_size: int = 64,
    count: int = 0,
    stream_len: int = 0,
    root: bytes = b"\0" * 16,
    header_count: int | None = None,
) -> bytes:
    """A segment sealed with the right key around any plaintext chunks, flags and footer:
    what a faulty writer holding the key could publish (authenticated but malformed)."""
    salt = bytes(32)
    seg_key, commitment = segment.derive_keys(KEY.plaintext, salt, STREAM, EPOCH, SEQ)
    header = SegmentHeader(
        version=1, stream=STREAM, epoch=EPOCH, seq=SEQ, start="0", end="1",
        first_source_time=1.0, last_source_time=2.0,
        record_count=count if header_count is None else header_count, created_at=3.0,
        key_id=KEY.key_id, wrapped_key=KEY.wrapped, salt=salt, commitment=commitment,
        frame_size=frame_size,
    )  # fmt: skip
    head = segment._encode_header(header)
    footer = segment._FOOTER.pack(segment.FOOTER_MAGIC, count, stream_len, root)
    ctx = segment._Frames(header, hashlib.sha256(head).digest(), footer, AESGCM(seg_key))
    out = [head]
    for i, (chunk, flag) in enumerate(zip(chunks, flags, strict=True)):
        sealed = ctx.aead.encrypt(segment._nonce(i), chunk, ctx.aad(i, flag))
        out += [segment._FRAME.pack(flag, len(sealed)), sealed]
    return b"".join([*out, footer])


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(data)


_PLAIN = st.binary(max_size=80) | st.binary(min_size=1, max_size=8).map(lambda b: b * 10)
_CHUNK = st.one_of(
    _PLAIN.map(lambda b: (b, 0)),
    _PLAIN.map(lambda b: (_zstd(b), segment.FLAG_ZSTD)),
    _PLAIN.flatmap(lambda b: mutants(_zstd(b)).map(lambda z: (z, segment.FLAG_ZSTD))),
    st.binary(max_size=40).map(lambda b: (b, segment.FLAG_ZSTD)),
)


@FUZZ
@given(
    st.lists(_CHUNK, min_size=1, max_size=4),
    st.integers(0, 6) | st.sampled_from([2**32, 2**64 - 1]),
    st.integers(0, 400) | st.sampled_from([2**63, 2**64 - 1]),
)
def test_authenticated_garbage_segments(
    chunks: list[tuple[bytes, int]], count: int, stream_len: int
) -> None:
    """Any plaintexts, compressed or not, under any footer: authenticated, yet rejected."""
    flags = [f for _, f in chunks]
    flags[-1] |= segment.FLAG_FINAL
    root = os.urandom(16)
    opened = open_valid(forge([c for c, _ in chunks], flags, count=count, stream_len=stream_len))
    if opened is not None:  # it can only open if everything it claims holds
        assert len(opened.records) == count and opened.root == root


@st.composite
def near_valid_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes] | None]:
    """A record stream cut into frames as a writer does, then damaged (a mutated stream, a
    wrong count, length or root in the footer): reaches the checks after authentication."""
    records = draw(st.lists(st.binary(max_size=90), max_size=5))
    stream = intact = b"".join(struct.pack(">I", len(r)) + r for r in records)
    if draw(st.booleans()):
        stream = draw(mutants(stream))
    chunks = [stream[i : i + 64] for i in range(0, len(stream), 64)] or [b""]
    zstd = draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)))
    zstd = [z and len(_zstd(c)) <= 64 for c, z in zip(chunks, zstd, strict=True)]  # fits F
    frames = [_zstd(c) if z else c for c, z in zip(chunks, zstd, strict=True)]
    flags = [segment.FLAG_ZSTD if z else 0 for z in zstd]
    flags[-1] |= segment.FLAG_FINAL
    count = draw(st.sampled_from([len(records), len(records) + 1, max(0, len(records) - 1)]))
    stream_len = draw(st.sampled_from([len(stream), len(stream) + 1, max(0, len(stream) - 1)]))
    true_root = merkle_root([leaf_hash(r) for r in records])
    root = draw(st.sampled_from([true_root, bytes(16)]))
    blob = forge(frames, flags, count=count, stream_len=stream_len, root=root)
    honest = (stream, count, stream_len, root) == (intact, len(records), len(stream), true_root)
    return blob, records if honest else None


@FUZZ
@given(near_valid_streams())
def test_authenticated_near_valid_segments(case: tuple[bytes, list[bytes] | None]) -> None:
    blob, records = case
    opened = open_valid(blob)
    if records is not None:  # nothing was damaged: it must open, with its records
        assert opened is not None and opened.records == records
    if opened is not None:
        h = opened.header
        assert len(opened.records) == h.record_count
        assert opened.root == merkle_root([leaf_hash(r) for r in opened.records])


def _peak(call: Any, *args: Any) -> int:
    tracemalloc.start()
    try:
        only((IntegrityError,), call, *args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_huge_claims_in_a_small_segment_allocate_nothing_big() -> None:
    """Counts and lengths are checked against the bytes at hand before anything is sized
    by them: a small input costs small memory, whatever its header says."""
    max_frame = segment.MAX_FRAME_SIZE
    hostile = [
        forge([b"x"], [segment.FLAG_FINAL], header_count=2**64 - 1, count=2**64 - 1),
        forge([b"x"], [segment.FLAG_FINAL], count=1, stream_len=2**64 - 1),
        forge([b"x"], [segment.FLAG_FINAL], frame_size=max_frame, count=2**64 - 1, stream_len=1),
        # an authenticated record stream whose first length prefix claims 4 GiB
        forge([b"\xff\xff\xff\xff" + b"x" * 20], [segment.FLAG_FINAL], count=1, stream_len=24),
        # zstd frames declaring more than a frame holds, or no size at all
        forge([_zstd(b"y" * 200)], [segment.FLAG_FINAL | segment.FLAG_ZSTD], count=1),
        forge(
            [zstandard.ZstdCompressor(write_content_size=False).compress(b"y" * 60)],
            [segment.FLAG_FINAL | segment.FLAG_ZSTD],
            count=1,
            stream_len=60,
        ),
    ]
    head = VALID[:HEADER_LEN]
    hostile += [
        head + struct.pack(">BI", 0, 2**32 - 1) + b"z" * 100,  # a frame claiming 4 GiB
        head + struct.pack(">BI", segment.FLAG_FINAL, 16) + b"t" * 16 + b"\0" * 40,
    ]
    for blob in hostile:
        assert len(blob) < 2048
        assert open_valid(blob) is None
        assert _peak(open_segment, blob, KEY.plaintext) < 256 << 10, blob[:64]


@FEW
@given(mutants(VALID))
def test_segment_mutants_in_bounded_memory(blob: bytes) -> None:
    assert _peak(open_segment, blob, KEY.plaintext) < 256 << 10


# --- PostgreSQL WAL records -------------------------------------------------------------------

WAL = [
    L.pack_record(1, 0x1000000, b"w" * 64),
    L.pack_history(2, b"1\t0/3000000\tno recovery target specified\n"),
    L.pack_record(1, 0x1FFFFC0, b"end of a WAL file".ljust(64, b".")),
]


@FUZZ
@given(st.binary(max_size=64) | st.sampled_from(WAL).flatmap(mutants))
def test_wal_record_unpacking(record: bytes) -> None:
    only((ValueError,), L.unpack_record, record)


def _header(start: int, end: int) -> SegmentHeader:
    return SegmentHeader(
        version=1, stream="pg", epoch=1, seq=4, start=str(start), end=str(end),
        first_source_time=0.0, last_source_time=0.0, record_count=0, created_at=0.0,
        key_id="k", wrapped_key=b"", salt=b"", commitment=b"", frame_size=64,
    )  # fmt: skip


@FUZZ
@given(
    st.lists(st.binary(max_size=40) | st.sampled_from(WAL).flatmap(mutants), max_size=4),
    st.integers(0, 2**64 - 1) | st.just(0x1000000),
    st.integers(0, 2**64 - 1) | st.just(0x1000040),
)
def test_wal_segment_records(records: list[bytes], start: int, end: int) -> None:
    only((IntegrityError,), decode_records, _header(start, end), records)


# --- objects records --------------------------------------------------------------------------

V = rec.Version(1_700_000_000_000_000_000, 7)
HEAD = rec.Head(5, "text/plain", {"owner": "ml"}, rec.content_hash(b"hello"))
OBJECT_RECORDS = [
    rec.encode(rec.Put("a/b.txt", V, HEAD, b"hello")),
    rec.encode(rec.Part("big", V, HEAD, 1, 3, 2, b"ll")),
    rec.encode(rec.Delete("gone", V)),
]


def _object_json(raw: bytes) -> tuple[bytes, Any, bytes]:
    (length,) = struct.unpack_from(">I", raw, 1)
    return raw[:1], json.loads(raw[5 : 5 + length]), raw[5 + length :]


def _framed(tag: bytes, raw: bytes, body: bytes) -> bytes:
    return tag + struct.pack(">I", len(raw)) + raw + body


def _reframe(tag: bytes, doc: Any, body: bytes) -> bytes:
    return _framed(tag, dumps(doc), body)


OBJECT_JSON = st.sampled_from(OBJECT_RECORDS).flatmap(
    lambda raw: st.tuples(
        st.sampled_from([b"P", b"R", b"D"]),
        json_mutants(_object_json(raw)[1]),
        st.sampled_from([_object_json(raw)[2], b"", b"hello"]),
    ).map(lambda t: _reframe(*t))
)


def _check_record(record: rec.Record) -> None:
    """What a decoded record promises its appliers (the mirror, restore)."""
    assert isinstance(record.key, str) and record.key and record.key.encode()
    assert isinstance(record.version.time_ns, int) and isinstance(record.version.seq, int)
    if isinstance(record, rec.Put | rec.Part):
        h = record.head
        assert isinstance(h.size, int) and h.size >= 0 and isinstance(h.content_type, str)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in h.metadata.items())
    if isinstance(record, rec.Part):
        assert 0 <= record.index < record.count and record.offset >= 0
    assert rec.decode(rec.encode(record)) == record


@FUZZ
@given(st.binary(max_size=200) | st.sampled_from(OBJECT_RECORDS).flatmap(mutants) | OBJECT_JSON)
@example(_reframe(b"D", {"k": "a", "v": 5}, b""))  # was AttributeError
@example(_framed(b"P", DEEP[0], b""))  # was RecursionError
@example(
    _framed(
        b"R",
        b'{"k":"a","v":"1.1","h":{"size":0,"ct":"","meta":{},"hash":""},"i":1e400,"n":1,"o":0}',
        b"",
    )
)  # was OverflowError
def test_objects_record_decoding(raw: bytes) -> None:
    record = only((IntegrityError,), rec.decode, raw)
    if record is not None:
        _check_record(record)


@FUZZ
@given(JSON_VALUES)
@example(5)  # was AttributeError
@example("².1")  # was ValueError (isdigit() takes superscripts, int() does not)
@example("1" * 5000 + ".1")  # was ValueError (int() refuses 5000 digits)
def test_object_version_decoding(value: Any) -> None:
    """Also read from the mirror's metadata, where only ``IntegrityError`` is caught."""
    only((IntegrityError,), rec.Version.decode, value)


@pytest.mark.parametrize(
    "header",
    [
        {"k": "a", "v": "1.1", "h": {"size": 0, "ct": "", "meta": {"x": 1}, "hash": ""}},
        {"k": "a", "v": "1.1", "h": {"size": 0, "ct": "", "meta": {}, "hash": ""}, "i": -1,
         "n": 0, "o": 0},
        {"k": "a", "v": "1.1", "h": {"size": 0, "ct": "", "meta": {}, "hash": ""}, "i": 3,
         "n": 3, "o": 0},
        {"k": "", "v": "1.1"},
        {"k": "\ud800", "v": "1.1"},
    ],
)  # fmt: skip
def test_objects_records_that_would_fail_in_the_mirror_are_integrity_errors(
    header: dict[str, Any],
) -> None:
    """Each of these decoded before, and then failed when applied with an error the stream
    retries forever (metadata botocore refuses, part number 0, a key S3 cannot encode)."""
    tag = b"R" if "i" in header else b"P" if "h" in header else b"D"
    with pytest.raises(IntegrityError):
        rec.decode(_reframe(tag, header, b""))


class _Bucket:
    """Just enough of ``Bucket`` for ``MirrorTarget``: an empty bucket taking uploads."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, list[str]]] = []

    async def head(self, key: str) -> Any:
        from replicators.errors import NotFound

        raise NotFound("absent", key=key)

    async def start_upload(self, key: str, content_type: str, metadata: Any) -> str:
        return "upload-1"

    async def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> str:
        return f"etag-{number}"

    async def finish_upload(self, key: str, upload_id: str, etags: list[str]) -> None:
        self.finished.append((key, etags))

    async def abort_upload(self, key: str, upload_id: str) -> None:
        pass


@pytest.mark.parametrize(
    "parts",
    [
        [(0, 3), (2, 3)],  # part 1 missing: S3 would refuse the completion, retried forever
        [(0, 3), (1, 2)],  # the last part says 2 parts, part 0 said 3: a truncated object
        [(0, 20_000), (1, 20_000)],  # more parts than S3 allows
    ],
)
async def test_mirror_halts_on_parts_that_disagree(
    tmp_path: Path, parts: list[tuple[int, int]]
) -> None:
    from replicators.objects.mirror import MirrorTarget
    from replicators.vault import SegmentRef

    bucket = _Bucket()
    target = MirrorTarget(bucket, tmp_path)  # type: ignore[arg-type]
    raws = [rec.encode(rec.Part("big", V, HEAD, i, n, i * 2, b"ab")) for i, n in parts]
    with pytest.raises(IntegrityError):
        await target.apply(SegmentRef(1, 1, "objects"), _header(0, len(raws)), raws)
    assert bucket.finished == []


# --- artifacts manifests ----------------------------------------------------------------------

_CHUNKS = [os.urandom(7), b"shared chunk", os.urandom(3)]


def _entry(path: str, *picks: tuple[int, int, int]) -> am.FileEntry:
    refs = tuple(
        am.ChunkRef(hashlib.sha256(_CHUNKS[c]).digest(), len(_CHUNKS[c]), p, r) for c, p, r in picks
    )
    return am.FileEntry(path, sum(x.length for x in refs), 0o100644, refs)


MANIFEST = am.Manifest(
    "llama", "v1",
    (_entry("config.json", (0, 0, 0)), _entry("w/model.bin", (1, 0, 1), (2, 1, 0), (1, 0, 1))),
    ("artifacts/models/packs/0a1b2c3d/000000000001.pack",
     "artifacts/models/packs/0a1b2c3d/000000000002.pack"),
    "fastcdc", 10.0, 11.0,
)  # fmt: skip
MANIFEST_DOC = json.loads(am.encode(MANIFEST))
TOMBSTONE_DOC = json.loads(am.encode_tombstone(am.Tombstone("llama", "v1", 12.0)))


def _restate_root(doc: Any) -> Any:
    """Half the JSON mutants get the root their content really has, so the checks behind the
    root comparison (which a faulty writer's manifest would pass) are reached too."""
    if not isinstance(doc, dict):
        return doc
    try:
        m = am.Manifest(
            "m", "v",
            tuple(
                am.FileEntry(f["path"], f["size"], f["mode"], tuple(
                    am.ChunkRef(bytes.fromhex(c[0]), c[1], c[2], c[3]) for c in f["chunks"]
                ))
                for f in doc["files"]
            ),
            (), "", 0.0, 0.0,
        )  # fmt: skip
        return {**doc, "root": m.root().hex()}
    except Exception:  # the fuzz broke the shape: its root cannot be computed, keep it
        return doc


MANIFEST_JSON = st.one_of(
    json_mutants(MANIFEST_DOC),
    json_mutants(MANIFEST_DOC).map(_restate_root),
    json_mutants(TOMBSTONE_DOC),
)


def _check_manifest(item: am.Manifest | am.Tombstone) -> None:
    """What a decoded manifest promises the target: it can be hashed, encoded, and
    every path can be created as a file."""
    assert am.valid_name(item.model) and am.valid_name(item.version)
    if isinstance(item, am.Tombstone):
        return
    item.root()
    assert am.decode(am.encode(item)) == item
    paths = {f.path for f in item.files}
    for f in item.files:
        assert f.path.encode() and not any(
            "/".join(f.path.split("/")[:i]) in paths for i in range(1, f.path.count("/") + 1)
        )


@FUZZ
@given(
    st.binary(max_size=200)
    | st.just(am.encode(MANIFEST)).flatmap(mutants)
    | MANIFEST_JSON.map(dumps)
)
@example(DEEP[0])  # was RecursionError
@example(dumps({**MANIFEST_DOC, "created_at": [1]}))  # was TypeError
@example(dumps({**MANIFEST_DOC, "files": 5}))  # was TypeError
def test_artifact_record_decoding(raw: bytes) -> None:
    for decoder in (am.decode_record, am.decode):
        item = only((IntegrityError,), decoder, raw)
        if item is not None:
            _check_manifest(item)


def _manifest_with(files: tuple[am.FileEntry, ...]) -> bytes:
    """A manifest listing ``files``, its root stated right when it can be computed."""
    stand_ins = tuple(dataclasses.replace(f, path=f"p{i}") for i, f in enumerate(files))
    doc = json.loads(am.encode(am.Manifest("llama", "v1", stand_ins, MANIFEST.packs, "c", 1, 2)))
    for f, listed in zip(files, doc["files"], strict=True):
        listed["path"] = f.path
    with contextlib.suppress(UnicodeEncodeError):  # no root for a path that is not UTF-8
        doc["root"] = am.manifest_root(files).hex()
    return dumps(doc)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ((_entry("a", (0, 0, 0)), _entry("a/b", (0, 0, 0))), "both a file and a directory"),
        ((_entry("\ud800", (0, 0, 0)),), "not UTF-8"),  # was UnicodeEncodeError (root)
        ((_entry("x" * 256, (0, 0, 0)),), "longer than"),  # was OSError at materialization
        ((_entry("d/" * 2100 + "f", (0, 0, 0)),), "longer than"),
    ],
)
def test_manifests_that_cannot_be_materialized_are_integrity_errors(
    files: tuple[am.FileEntry, ...], message: str
) -> None:
    with pytest.raises(IntegrityError, match=message):
        am.decode_record(_manifest_with(files))


def test_a_chunk_longer_than_its_u32_is_an_integrity_error() -> None:
    doc = copy.deepcopy(MANIFEST_DOC)
    doc["files"][0]["chunks"][0][1] = 2**40  # was struct.error computing the root
    doc["files"][0]["size"] = 2**40
    with pytest.raises(IntegrityError, match="bad chunk entry"):
        am.decode(dumps(doc))


def test_names_and_pack_keys_end_where_they_seem_to() -> None:
    from replicators.artifacts.packs import PackRef

    assert not am.valid_name("v1\n")  # ``$`` matched before a final newline
    with pytest.raises(IntegrityError):
        PackRef.parse(MANIFEST.packs[0] + "\n")
    with pytest.raises(IntegrityError):
        PackRef.parse("artifacts/models/packs/0a1b2c3d/٠٠٠٠٠٠٠٠٠٠٠١.pack")


async def test_artifacts_target_halts_on_a_manifest_it_cannot_materialize(tmp_path: Path) -> None:
    """A file that is also a directory: decoded before, then failed in the target with an
    ``OSError`` that the stream retried forever."""
    from replicators.artifacts.options import ArtifactsOptions
    from replicators.artifacts.target import ArtifactsTarget
    from replicators.vault import SegmentRef

    target = ArtifactsTarget(
        ArtifactsOptions(root=tmp_path / "models"),
        store=None,  # type: ignore[arg-type]
        keys=None,  # type: ignore[arg-type]
        state_dir=tmp_path / "state",
    )
    raw = _manifest_with((_entry("a", (0, 0, 0)), _entry("a/b", (0, 0, 0))))
    with pytest.raises(IntegrityError, match="both a file and a directory"):
        await target.apply(SegmentRef(1, 1, "artifacts"), _header(0, 1), [raw])
    assert not (tmp_path / "state" / "applied.json").exists()


# --- base-backup manifests --------------------------------------------------------------------

BACKUP = BackupManifest(
    id="20261128T101500Z", stream="pg", timeline=1, start_lsn=0x3000028, end_lsn=0x3000138,
    start_time=1_800_000_000.0, end_time=1_800_000_060.5,
    parts=[{"key": "backups/pg/20261128T101500Z/part-00000001.seg", "size": 10, "stored": 400,
            "root": "0" * 32}],
    bytes=10,
)  # fmt: skip


def test_backup_manifest_round_trip() -> None:
    assert BackupManifest.from_json(BACKUP.to_json()) == BACKUP


@FUZZ
@given(
    st.binary(max_size=200)
    | st.just(BACKUP.to_json()).flatmap(mutants)
    | json_mutants(json.loads(BACKUP.to_json())).map(dumps)
)
@example(b"[]")  # was TypeError
@example(b'{"start_lsn": "0/1", "end_lsn": "0/1"}')  # was KeyError
@example(dumps({**json.loads(BACKUP.to_json()), "start_lsn": 5}))  # was AttributeError
@example(DEEP[1])  # was RecursionError
def test_backup_manifest_decoding(raw: bytes) -> None:
    m = only((IntegrityError,), BackupManifest.from_json, raw)
    if m is not None:
        assert BackupManifest.from_json(m.to_json()) == m
        assert m.bytes == sum(p["size"] for p in m.parts)


# --- synthetic records ------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=64) | st.just(make_record(5, 1.5, 40, True)).flatmap(mutants))
def test_synthetic_record_parsing(record: bytes) -> None:
    only((IntegrityError,), parse_record, record)


# --- notifications: S3 events, filer events, the filer's output stream ------------------------

S3_EVENT = {
    "Records": [
        {
            "eventName": "ObjectCreated:Put",
            "eventTime": "2026-11-28T10:00:00.000Z",
            "s3": {
                "bucket": {"name": "data"},
                "object": {"key": "logs/run+1/%C3%A9t%C3%A9.json", "sequencer": "0055"},
            },
        },
        {
            "eventName": "ObjectRemoved:Delete",
            "eventTime": "2026-11-28T10:00:01Z",
            "s3": {"bucket": {"name": "data"}, "object": {"key": "old"}},
        },
    ]
}
FILER_EVENT = {
    "directory": "/buckets/data/x",
    "eventNotification": {
        "oldEntry": {"name": "a.txt", "isDirectory": False},
        "newEntry": {"name": "b.txt", "isDirectory": False, "attributes": {"fileSize": "3"}},
        "newParentPath": "/buckets/data/y",
    },
    "tsNs": "1795859973176216701",
}


@FUZZ
@given(json_mutants(S3_EVENT))
@example({"Records": {"a": 1}})  # was AttributeError
@example({"Records": 5})  # was TypeError
@example({"Records": [{"eventName": "ObjectCreated:Put", "s3": [1]}]})  # was AttributeError
def test_s3_event_parsing(message: Any) -> None:
    if isinstance(message, dict):  # the webhook refuses anything else before parsing
        only((ValueError,), s3_event_hints, message)


@FUZZ
@given(json_mutants(FILER_EVENT))
@example({"tsNs": "x"})  # was ValueError from int(), unhandled by the tail
@example({"tsNs": 1e400})  # was OverflowError
@example({"eventNotification": [1]})  # was AttributeError
@example({"eventNotification": {"oldEntry": {"isDirectory": False}}})  # was KeyError
def test_filer_event_parsing(event: Any) -> None:
    if isinstance(event, dict):  # the stream yields only objects
        only((ValueError,), filer_hints, event)


_DOCS = [FILER_EVENT, {"directory": "/buckets/data/é", "tsNs": 1}, {"nested": {"a": [1, "}{"]}}]
_TEXT = "".join(json.dumps(d, indent=2, ensure_ascii=False) + "\n" for d in _DOCS).encode()


@FUZZ
@given(st.lists(st.integers(1, len(_TEXT)), max_size=12))
def test_json_stream_cuts_anywhere(cuts: list[int]) -> None:
    """However the filer's output is cut into reads (within a UTF-8 character too), the
    same objects come out."""
    stream, got, last = JsonStream(), [], 0
    for cut in [*sorted(cuts), len(_TEXT)]:
        got += list(stream.feed(_TEXT[last:cut]))
        last = cut
    assert got == _DOCS  # "é" was two U+FFFD when a read ended inside it


@FUZZ
@given(st.lists(st.binary(max_size=80) | st.just(_TEXT).flatmap(mutants), max_size=6))
def test_json_stream_random_output_stays_bounded(reads: list[bytes]) -> None:
    stream = JsonStream(max_event=1000)
    for data in reads:
        for value in stream.feed(data):
            assert isinstance(value, dict)
        assert len(stream._buf) <= 1000 + len(data)


def test_json_stream_skips_a_malformed_object_and_goes_on() -> None:
    """A value that can never parse was kept as the partial tail, and every later event
    was appended behind it and never read (a stalled subscription, a growing buffer)."""
    stream = JsonStream(max_event=64)
    assert list(stream.feed(b'{ not json }\n{"a": 1}\n')) == [{"a": 1}]
    assert list(stream.feed(b'{"b": 2}\n')) == [{"b": 2}]
    assert list(stream.feed(b'{"c": "' + b"x" * 100)) == []  # longer than max_event: dropped
    assert list(stream.feed(b'"}\n{"d": 4}\n')) == [{"d": 4}]
    assert stream.dropped >= 2 and len(stream._buf) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_webhook_refuses_malformed_notifications_with_400() -> None:
    from replicators.objects.options import WebhookEvents
    from replicators.objects.webhook import S3Webhook

    port = _free_port()
    hook = S3Webhook(WebhookEvents(listen=f"127.0.0.1:{port}"), "data", "")
    await hook.start()
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/events"
            for body in (b'{"Records": 5}', b'{"Records": ["x"]}', b"[" * 100_000, b"\xff"):
                async with http.post(url, data=body) as resp:
                    assert resp.status == 400, body[:40]
            async with http.post(url, data=json.dumps(S3_EVENT)) as resp:
                assert resp.status == 204
        assert {h.key for h in await hook.poll()} == {"logs/run 1/été.json", "old"}
    finally:
        await hook.stop()


# --- positive control: last, after every fuzz above has run in this process ----------------


def test_a_valid_segment_still_opens_after_the_fuzz() -> None:
    """The reader keeps per-thread zstd state; no failure above may have damaged it."""
    compressible = [b"row %d, the same text again and again\n" % i * 40 for i in range(30)]
    for blob, records in ((VALID, RECORDS), (make(compressible, frame_size=4096), compressible)):
        opened = open_valid(blob)
        assert opened is not None and opened.records == records
