"""Segments: round trips, and rejection of every kind of damage (docs/segment-format.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import xxhash
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import example, given, settings
from hypothesis import strategies as st

from replicators import segment
from replicators.errors import IntegrityError
from replicators.segment import (
    FLAG_FINAL,
    FLAG_ZSTD,
    DataKey,
    SegmentHeader,
    open_segment,
    read_header,
    seal,
)
from verifiers.merkle import EMPTY_ROOT, leaf_hash, merkle_root

KEY = DataKey("k-test-1", os.urandom(32), b"wrapped-key-bytes")
FRAME_HEAD = struct.Struct(">BI")


def make(records: list[bytes], **overrides: object) -> bytes:
    args: dict[str, object] = dict(
        stream="postgres",
        epoch=3,
        seq=17,
        start="0/16B3748",
        end="0/16B9000",
        first_source_time=1_700_000_000.25,
        last_source_time=1_700_000_001.5,
        data_key=KEY,
        created_at=1_700_000_002.0,
    )
    args.update(overrides)
    return seal(records, **args)  # type: ignore[arg-type]


def frames(blob: bytes) -> list[tuple[int, int, int]]:
    """(flags, start of frame header, end of frame) for each frame of a well-formed blob."""
    (header_len,) = struct.unpack_from(">H", blob, 10)
    out, pos = [], header_len
    while True:
        flags, length = FRAME_HEAD.unpack_from(blob, pos)
        out.append((flags, pos, pos + FRAME_HEAD.size + length))
        pos += FRAME_HEAD.size + length
        if flags & FLAG_FINAL:
            return out


def rejects(
    blob: bytes, key: bytes = KEY.plaintext, match: str | None = None, **expect: object
) -> str:
    with pytest.raises(IntegrityError, match=match) as info:
        open_segment(blob, key, **expect)  # type: ignore[arg-type]
    return str(info.value)


# --- round trips ------------------------------------------------------------------------------

compressible = st.binary(min_size=1, max_size=16).map(lambda b: b * 150)
records_st = st.lists(st.one_of(st.binary(max_size=3000), compressible), max_size=12)


@example([b"\x00\x00", b"\x00\x00", b"\x00" * 44, b""], 64, 1)  # ends on a frame edge
@settings(max_examples=120, deadline=None)
@given(records_st, st.sampled_from([64, 100, 512, 4096, 1 << 20]), st.integers(1, 5))
def test_round_trip(records: list[bytes], frame_size: int, level: int) -> None:
    blob = make(records, frame_size=frame_size, level=level)
    opened = open_segment(
        blob, KEY.plaintext, expect_stream="postgres", expect_epoch=3, expect_seq=17
    )
    assert opened.records == records
    assert all(type(r) is bytes for r in opened.records)
    assert opened.root == merkle_root([leaf_hash(r) for r in records])
    assert opened.header == read_header(blob)
    h = opened.header
    assert (h.stream, h.epoch, h.seq, h.start, h.end) == (
        "postgres",
        3,
        17,
        "0/16B3748",
        "0/16B9000",
    )
    assert (h.first_source_time, h.last_source_time, h.created_at) == (
        1_700_000_000.25,
        1_700_000_001.5,
        1_700_000_002.0,
    )
    assert (h.record_count, h.key_id, h.wrapped_key, h.frame_size) == (
        len(records),
        "k-test-1",
        b"wrapped-key-bytes",
        frame_size,
    )


def test_empty_segment_is_a_heartbeat() -> None:
    blob = make([])
    opened = open_segment(blob, KEY.plaintext)
    assert opened.records == [] and opened.root == EMPTY_ROOT
    assert len(frames(blob)) == 1
    assert open_segment(make([b""]), KEY.plaintext).records == [b""]


def test_records_bigger_than_a_frame() -> None:
    records = [os.urandom(5000), b"x" * 20000, b"", os.urandom(70)]
    blob = make(records, frame_size=1024)
    assert len(frames(blob)) > 20
    assert open_segment(blob, KEY.plaintext).records == records


@pytest.mark.parametrize("stream_len", [4, 63, 64, 65, 127, 128, 129, 640])
def test_stream_lengths_around_frame_boundaries(stream_len: int) -> None:
    records = [os.urandom(stream_len - 4)]
    if stream_len >= 40:
        records = [os.urandom(10), os.urandom(stream_len - 18)]
    blob = make(records, frame_size=64)
    assert len(frames(blob)) == max(1, -(-stream_len // 64))
    assert open_segment(blob, KEY.plaintext).records == records


def test_incompressible_frames_are_stored_raw_and_compressible_ones_zstd() -> None:
    raw = make([os.urandom(300_000)], frame_size=100_000)
    assert all(not flags & FLAG_ZSTD for flags, _, _ in frames(raw))
    assert len(raw) < 300_000 + 1000  # no expansion beyond framing
    packed = make([b"INSERT INTO runs VALUES (1, 'x');\n" * 10_000], frame_size=100_000)
    assert all(flags & FLAG_ZSTD for flags, _, _ in frames(packed))
    assert len(packed) < 340_000 / 20


def test_seal_and_open_from_several_threads() -> None:
    def round_trip(seed: int) -> bool:
        rng = random.Random(seed)
        records = [rng.randbytes(rng.randrange(0, 5000)) + b"abc" * 500 for _ in range(20)]
        blob = make(records, seq=seed, frame_size=4096, level=1 + seed % 3)
        return open_segment(blob, KEY.plaintext, expect_seq=seed).records == records

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(round_trip, range(24)))


def test_data_key_repr_hides_the_plaintext() -> None:
    key = DataKey("k-1", bytes(range(32)), b"w")
    for text in (repr(key), str(key), repr([key])):
        assert bytes(range(32)).hex() not in text and "\\x00\\x01" not in text
        assert "k-1" in text


def test_each_seal_uses_a_fresh_salt() -> None:
    a, b = make([b"same"]), make([b"same"])
    assert a != b and read_header(a).salt != read_header(b).salt


def test_seal_rejects_what_the_format_cannot_carry() -> None:
    for bad in (
        {"frame_size": 63},
        {"frame_size": (64 << 20) + 1},
        {"stream": ""},
        {"start": "x" * 256},
    ):
        with pytest.raises(ValueError):
            make([b"r"], **bad)
    with pytest.raises(ValueError):
        make([b"r"], data_key=DataKey("k", b"short", b"w"))


# --- damage -----------------------------------------------------------------------------------


def small_segment() -> bytes:
    blob = make([b"alpha", os.urandom(90), b"gamma" * 4], frame_size=64)
    assert 250 < len(blob) < 700 and len(frames(blob)) >= 2
    return blob


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_single_byte_flip_is_rejected(mask: int) -> None:
    blob = small_segment()
    for i in range(len(blob)):
        damaged = bytearray(blob)
        damaged[i] ^= mask
        try:
            open_segment(bytes(damaged), KEY.plaintext)
        except IntegrityError:
            continue
        pytest.fail(f"flipping byte {i} with {mask:#04x} was not detected")


def test_every_truncation_of_a_small_segment_is_rejected() -> None:
    blob = small_segment()
    for n in range(len(blob)):
        rejects(blob[:n])


def test_truncation_at_frame_boundaries_and_random_points() -> None:
    blob = make([os.urandom(10_000)], frame_size=1024)
    layout = frames(blob)
    for _, start, _ in layout:
        rejects(blob[:start], match="truncated: final frame missing")
    rejects(blob[: layout[-1][2]], match="truncated: footer cut short")
    rng = random.Random(5)
    for n in rng.sample(range(len(blob)), 200):
        rejects(blob[:n])
    rejects(blob + b"\x00", match="1 trailing bytes after the footer")


def test_reordered_frames_are_rejected() -> None:
    blob = make([os.urandom(8000)], frame_size=1024)
    (_, a0, a1), (_, b0, b1) = frames(blob)[1:3]
    swapped = blob[:a0] + blob[b0:b1] + blob[a0:a1] + blob[b1:]
    assert len(swapped) == len(blob)
    rejects(swapped, match="frame 1 failed authentication")


def test_frame_spliced_from_another_segment_with_the_same_key_is_rejected() -> None:
    records = [os.urandom(8000)]
    one, other = make(records, frame_size=1024), make(records, frame_size=1024)
    _, start, end = frames(one)[2]
    _, o_start, o_end = frames(other)[2]
    assert end - start == o_end - o_start
    spliced = one[:start] + other[o_start:o_end] + one[end:]
    rejects(spliced, match="frame 2 failed authentication")
    # another segment's header in front of these frames: its key derivation differs
    (header_len,) = struct.unpack_from(">H", one, 10)
    rejects(other[:header_len] + one[header_len:], match="frame 0 failed authentication")


def test_dropping_a_middle_frame_is_rejected() -> None:
    blob = make([os.urandom(8000)], frame_size=1024)
    _, start, end = frames(blob)[3]
    rejects(blob[:start] + blob[end:])


def test_wrong_key_is_reported_as_such() -> None:
    blob = make([b"record"])
    assert "wrong key (commitment mismatch)" in rejects(blob, os.urandom(32))
    assert "wrong key" in rejects(blob, b"short")


def test_wrong_expected_identity() -> None:
    blob = make([b"record"])
    assert "expected stream 'objects'" in rejects(blob, expect_stream="objects")
    assert "expected epoch 4, header says 3" in rejects(blob, expect_epoch=4)
    assert "expected seq 16" in rejects(blob, expect_seq=16)
    msg = rejects(blob, expect_seq=18)
    assert msg.startswith("segment postgres/3/17: ")


def reforge_header(blob: bytes, **changes: object) -> bytes:
    """Rewrite header fields with a valid checksum: what an attacker without the key can do."""
    header = dataclasses.replace(read_header(blob), **changes)
    (header_len,) = struct.unpack_from(">H", blob, 10)
    return segment._encode_header(header) + blob[header_len:]


def test_forged_header_with_valid_checksum_is_rejected() -> None:
    blob = make([b"record"] * 3)
    rejects(reforge_header(blob, epoch=4), match="wrong key")  # identity is in the key derivation
    rejects(reforge_header(blob, end="0/FFFFFFFF"), match="frame 0 failed authentication")
    rejects(reforge_header(blob, last_source_time=0.0), match="frame 0 failed authentication")


def test_forged_footer_is_rejected() -> None:
    blob = make([b"a", b"b"])
    forged = blob[:-16] + merkle_root([leaf_hash(b"a")])
    rejects(forged, match="frame 0 failed authentication")


def test_damaged_header_is_reported_before_any_key_is_needed() -> None:
    blob = make([b"record"])
    damaged = bytearray(blob)
    damaged[60] ^= 1
    with pytest.raises(IntegrityError, match="header checksum mismatch"):
        read_header(bytes(damaged))
    for garbage in (b"", b"\x89DRSEG", os.urandom(500), b"x" * 4096):
        with pytest.raises(IntegrityError):
            read_header(garbage)
    newer = bytearray(blob)
    newer[8:10] = (2).to_bytes(2, "big")
    with pytest.raises(IntegrityError, match="unsupported format version 2"):
        read_header(bytes(newer))


def test_writer_bug_is_caught_by_the_merkle_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segment, "merkle_root", lambda leaves: b"\x00" * 16)
    blob = make([b"a", b"b"])
    monkeypatch.undo()
    rejects(blob, match="merkle root mismatch")


def test_bytes_after_a_zstd_frame_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A (buggy or hostile) writer holding the key appends data after a frame's zstd
    stream: authenticated, yet refused."""
    real = segment._encode_chunk

    def padded(chunk: bytes, cctx: object) -> tuple[bytes, int]:
        packed, flag = real(chunk, cctx)  # type: ignore[arg-type]
        return (packed + b"trailing", flag) if flag else (packed, flag)

    monkeypatch.setattr(segment, "_encode_chunk", padded)
    blob = make([b"x" * 4000, b"y" * 4000])
    monkeypatch.undo()
    rejects(blob, match="bytes after the zstd frame")


def test_frames_decrypt_with_the_documented_key_nonce_and_aad() -> None:
    blob = make([b"record"])
    (header_len,) = struct.unpack_from(">H", blob, 10)
    h: SegmentHeader = read_header(blob)
    seg_key, _ = segment.derive_keys(KEY.plaintext, h.salt, h.stream, h.epoch, h.seq)
    digest = hashlib.sha256(blob[:header_len]).digest()
    flags, start, end = frames(blob)[0]
    assert flags == FLAG_FINAL
    raw = h.stream.encode()
    aad = (
        b"dragent-segment-v1"
        + digest
        + struct.pack(">QQIB", h.epoch, h.seq, 0, flags)
        + struct.pack(">H", len(raw))
        + raw
        + blob[-40:]
    )
    nonce = bytes(12)
    plain = AESGCM(seg_key).decrypt(nonce, blob[start + 5 : end], aad)
    assert plain == struct.pack(">I", 6) + b"record"
    assert xxhash.xxh3_128_digest(blob[: header_len - 16]) == blob[header_len - 16 : header_len]
