"""The pure core of the artifacts kind: chunking, manifests, packs, the store layout."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from replicators.artifacts import layout
from replicators.artifacts.chunker import Chunker, chunk_id
from replicators.artifacts.manifest import (
    ChunkRef,
    FileEntry,
    Manifest,
    Tombstone,
    decode,
    decode_record,
    encode,
    encode_tombstone,
    locate,
)
from replicators.artifacts.packs import FRAME_SIZE, PackRef, damaged_records, seal_pack
from replicators.errors import IntegrityError
from replicators.segment import DataKey, open_segment

KEY = DataKey("k-test", b"\x07" * 32, b"wrapped")


def chunker() -> Chunker:
    return Chunker(16 << 10, 64 << 10, 256 << 10)


def test_an_edit_moves_only_nearby_chunk_boundaries(tmp_path: Path) -> None:
    data = bytearray(os.urandom(4 << 20))
    before = {p.id for p in chunker().cut_bytes(bytes(data))}
    data[2 << 20 : (2 << 20) + 100] = os.urandom(100)
    data[1 << 20 : 1 << 20] = b"inserted bytes shift everything after them"
    after = list(chunker().cut_bytes(bytes(data)))
    new = [p for p in after if p.id not in before]
    assert sum(p.length for p in after) == len(data)
    assert sum(p.length for p in new) < len(data) // 8  # two edits: a few chunks each


def test_cut_file_matches_cut_bytes_and_ids_are_sha256(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    from_file = [(p.offset, p.length, p.id) for p in chunker().cut_file(path)]
    assert from_file == [(p.offset, p.length, p.id) for p in chunker().cut_bytes(data)]
    o, n, ident = from_file[1]
    assert ident == chunk_id(data[o : o + n])
    (tmp_path / "empty").write_bytes(b"")
    assert list(chunker().cut_file(tmp_path / "empty")) == []


def manifest(files: tuple[FileEntry, ...], packs: tuple[str, ...] = ("p0", "p1")) -> Manifest:
    return Manifest("llama", "v1", files, packs, "test", 1.0, 2.0)


def entry(path: str, *chunks: tuple[bytes, int, int]) -> FileEntry:
    refs = tuple(ChunkRef(chunk_id(d), len(d), pack, rec) for d, pack, rec in chunks)
    return FileEntry(path, sum(len(d) for d, _, _ in chunks), 0o644, refs)


def test_manifest_round_trip_and_root_ignores_where_chunks_live() -> None:
    a = manifest((entry("w.bin", (b"aa", 0, 0), (b"bbb", 1, 0)), entry("c.json", (b"{}", 0, 1))))
    again = decode(encode(a))
    assert again == a and again.root() == a.root()
    moved = manifest(
        (entry("c.json", (b"{}", 1, 5)), entry("w.bin", (b"aa", 1, 3), (b"bbb", 0, 9)))
    )
    assert moved.root() == a.root()  # same content, other packs, other file order
    edited = manifest(
        (entry("w.bin", (b"aa", 0, 0), (b"bbc", 1, 0)), entry("c.json", (b"{}", 0, 1)))
    )
    assert edited.root() != a.root()
    assert {k: len(v) for k, v in locate(a).items()} == {"p0": 2, "p1": 1}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.replace(b'"root":"', b'"root":"00'), "stated root"),
        (lambda d: d.replace(b'"path":"w.bin"', b'"path":"../w.bin"'), "unsafe file path"),
        (lambda d: d.replace(b'"size":5', b'"size":6'), "chunk lengths add up"),
        (lambda d: d.replace(b'"model":"llama"', b'"model":".."'), "unsafe model"),
        (lambda d: d[:-2], "not JSON"),
    ],
)
def test_malformed_manifests_are_rejected(mutate, message: str) -> None:
    raw = encode(manifest((entry("w.bin", (b"aa", 0, 0), (b"bbb", 1, 0)),)))
    with pytest.raises(IntegrityError, match=message):
        decode(mutate(raw))


def test_pack_is_a_sealed_segment_bound_to_its_name() -> None:
    ref = PackRef("models", "0a1b2c3d", 7)
    assert PackRef.parse(ref.key) == ref
    chunks = [os.urandom(1000), b"x" * 5000]
    blob = seal_pack(ref, chunks, KEY)
    opened = open_segment(blob, KEY.plaintext, expect_stream=ref.sealed_stream, expect_seq=7)
    assert opened.records == chunks
    other = PackRef("models", "0a1b2c3d", 8)
    with pytest.raises(IntegrityError, match="expected seq"):
        open_segment(blob, KEY.plaintext, expect_stream=other.sealed_stream, expect_seq=8)


def test_a_failed_frame_maps_to_the_chunks_it_held() -> None:
    lengths = {0: FRAME_SIZE - 10, 1: 100, 2: 2 * FRAME_SIZE, 3: 10}
    err = IntegrityError("frame 1 failed authentication (tampered)", where="segment s/0/1")
    assert damaged_records(err, lengths) == [1, 2]
    err = IntegrityError("frame 3 failed authentication", where="segment s/0/1")
    assert damaged_records(err, lengths) == [2, 3]
    assert damaged_records(IntegrityError("merkle root mismatch"), lengths) is None


def test_layout_scan_and_completeness(tmp_path: Path) -> None:
    v = tmp_path / "llama" / "v1"
    (v / "sub").mkdir(parents=True)
    (v / "w.bin").write_bytes(b"abc")
    (v / "sub" / "x").write_bytes(b"d")
    (v / ".partial").write_bytes(b"hidden")
    (tmp_path / ".tmp" / "v9").mkdir(parents=True)
    [info] = layout.scan(tmp_path)
    assert info.name == "llama/v1" and [f.path for f in info.files] == ["sub/x", "w.bin"]
    now = time.time()
    assert not layout.complete(info, now, None, 30.0)
    assert layout.complete(info, now + 31, None, 30.0)
    assert not layout.complete(info, now + 31, "_COMPLETE", 30.0)
    (v / "_COMPLETE").write_bytes(b"")
    again = layout.scan_version(tmp_path, "llama", "v1")
    assert again is not None and layout.complete(again, now, "_COMPLETE", 30.0)
    assert again.fingerprint() != info.fingerprint()


def test_tombstones_round_trip_and_manifests_still_decode() -> None:
    t = Tombstone("llama", "v1", 5.0)
    assert decode_record(encode_tombstone(t)) == t
    m = manifest((entry("w.bin", (b"aa", 0, 0)),))
    assert decode_record(encode(m)) == m
    with pytest.raises(IntegrityError, match="unsafe"):
        decode_record(encode_tombstone(Tombstone("..", "v1", 5.0)))


def test_packs_are_published_through_the_vault_create_only(tmp_path: Path) -> None:
    import asyncio

    from benchmarks.dirstore import DirStore
    from replicators.errors import AlreadyExists
    from replicators.vault import Vault

    vault = Vault(DirStore(tmp_path))
    key = PackRef("s", "0123abcd", 1).key
    asyncio.run(vault.put_blob(key, b"sealed"))
    with pytest.raises(AlreadyExists):
        asyncio.run(vault.put_blob(key, b"other"))
    for bad in ("streams/s/0000000001/00000000000000000001.seg", "", "/abs"):
        with pytest.raises(ValueError, match="not a name for a blob"):
            asyncio.run(vault.put_blob(bad, b"x"))
