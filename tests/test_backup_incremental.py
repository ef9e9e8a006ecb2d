"""Incremental base backups (manifest version 2): chunks, packs, dedupe against the
newest complete backup, and the first format (parts) still restorable.

The lab tests back up region a's primary (the whole cluster) into region a's
first vault, each under its own stream name, and read back with region b's keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from agent.config import AgentConfig
from agent.lab import Lab
from agent.lab.ports import free_port
from replicators.chunking import Chunker
from replicators.errors import IntegrityError, SourceError
from replicators.keys import KeyProvider, build_key_provider
from replicators.postgres import standby
from replicators.postgres.backupchunks import (
    CHUNKER,
    ChunkRef,
    chunk_blocks,
    parse_pack_key,
    seal_put,
    sealed_name,
)
from replicators.postgres.basebackup import (
    BackupManifest,
    backup_keys,
    backup_prefix,
    backups_read,
    extract_backup,
    list_backups,
    take_backup,
)
from replicators.postgres.options import PostgresOptions
from replicators.s3 import S3Store
from replicators.settings import Secret
from tests.test_fuzz import FUZZ, dumps, json_mutants, mutants, only

WORK_ROOT = Path("/tmp/dragent-pg-tests")  # reachable by the postgres OS user
ROWS = 300_000


# --- without the lab ----------------------------------------------------------------------------


def _v2(**changes: object) -> dict[str, object]:
    key = "backups/pg/20261206T101500Z/pack-00000001.seg"
    d: dict[str, object] = {
        "version": 2, "id": "20261206T101500Z", "stream": "pg", "timeline": 1,
        "start_lsn": "0/3000028", "end_lsn": "0/3000138",
        "start_time": 1_800_000_000.0, "end_time": 1_800_000_060.5, "bytes": 30,
        "chunker": CHUNKER.params,
        "packs": [{"key": key, "size": 20, "stored": 400, "root": "0" * 32}],
        "chunks": [[0, 0, 20, "a" * 64], [0, 0, 10, "b" * 64]],
    }  # fmt: skip
    return {**d, **changes}


def test_v2_manifest_round_trip_and_keys() -> None:
    m = BackupManifest.from_json(json.dumps(_v2()).encode())
    assert m.version == 2 and m.bytes == 30 and m.stored == 400
    assert m.chunks == [ChunkRef(0, 0, 20, "a" * 64), ChunkRef(0, 0, 10, "b" * 64)]
    assert BackupManifest.from_json(m.to_json()) == m
    assert backup_keys(m) == {
        "backups/pg/20261206T101500Z/manifest.seg",
        "backups/pg/20261206T101500Z/pack-00000001.seg",
    }
    # a pack of an earlier backup is needed, but not shipped by this one
    old = "backups/pg/20261205T101500Z/pack-00000003.seg"
    packs = [{"key": old, "size": 20, "stored": 400, "root": "0" * 32}]
    m = BackupManifest.from_json(json.dumps(_v2(packs=packs)).encode())
    assert m.stored == 0 and old in backup_keys(m)


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"chunks": [[0, 0, 20, "a" * 64], [1, 0, 10, "b" * 64]]}, "names no pack"),
        ({"chunks": [[0, 15, 15, "a" * 64]], "bytes": 15}, "not inside its pack"),
        ({"chunks": [[0, 0, 20, "A" * 64]], "bytes": 20}, "not a SHA-256"),
        ({"bytes": 31}, "sum of the chunks"),
        ({"version": 3}, "expected the fields"),
        ({"parts": []}, "expected the fields"),
        (
            {"packs": [{"key": "backups/pg/20261207T000000Z/pack-00000001.seg", "size": 20,
                        "root": "0" * 32}]},
            "later backup",
        ),
    ],
)  # fmt: skip
def test_v2_manifest_rejects(changes: dict[str, object], why: str) -> None:
    with pytest.raises(IntegrityError, match=why):
        BackupManifest.from_json(json.dumps(_v2(**changes)).encode())


@FUZZ
@given(st.just(json.dumps(_v2()).encode()).flatmap(mutants) | json_mutants(_v2()).map(dumps))
def test_v2_manifest_decoding_raises_only_integrity_errors(raw: bytes) -> None:
    m = only((IntegrityError,), BackupManifest.from_json, raw)
    if m is not None:
        assert BackupManifest.from_json(m.to_json()) == m
        assert m.bytes == sum(c.length for c in m.chunks)
        assert all(0 <= c.pack < len(m.parts) for c in m.chunks)


def test_v1_manifest_still_parses() -> None:
    d = {k: v for k, v in _v2().items() if k not in ("version", "chunker", "packs", "chunks")}
    key = "backups/pg/20261206T101500Z/part-00000001.seg"
    d |= {"parts": [{"key": key, "size": 30, "stored": 90, "root": "1" * 32}]}
    m = BackupManifest.from_json(json.dumps(d).encode())
    assert m.version == 1 and m.stored == 90 and backup_keys(m) >= {key}
    assert json.loads(m.to_json()) == d  # written back in the first format, unchanged


def test_fed_cutter_cuts_as_one_buffer() -> None:
    chunker = Chunker(16 << 10, 64 << 10, 256 << 10)
    data = os.urandom(3 << 20) + bytes(1 << 20) + os.urandom(1 << 20)
    whole = list(chunker.cut_bytes(data))
    cutter, got = chunker.cutter(), []
    for at in range(0, len(data), 300_001):
        got += cutter.feed(data[at : at + 300_001])
    got += cutter.finish()
    assert got == whole and b"".join(p.data for p in got) == data


# --- on the lab ---------------------------------------------------------------------------------


@dataclass
class Rig:
    lab: Lab
    stream: str
    options: PostgresOptions
    store: S3Store
    send_keys: KeyProvider
    recv_keys: KeyProvider
    workdir: Path
    clusters: list[Path]

    async def backup(self) -> BackupManifest:
        """A backup with an id of its own (ids are seconds)."""
        newest = await list_backups(self.store, self.recv_keys, self.stream)
        if newest:
            await asyncio.sleep(max(0.0, int(newest[-1].start_time) + 1.05 - time.time()))
        return await take_backup(self.options, self.stream, self.store, self.send_keys)

    def empty_dir(self, name: str) -> Path:
        path = self.workdir / name
        assert not path.exists()
        return path


def make_workdir(name: str) -> Path:
    WORK_ROOT.mkdir(exist_ok=True)
    WORK_ROOT.chmod(0o755)
    workdir = WORK_ROOT / name
    workdir.mkdir()
    workdir.chmod(0o755)
    return workdir


@pytest_asyncio.fixture(loop_scope="session")
async def rig(lab: Lab, cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str) -> AsyncIterator[Rig]:
    await lab.up()
    workdir = make_workdir(unique)
    options = PostgresOptions(dsn=Secret(lab.pg_dsn("a"), "test"), slot="unused")
    store = await S3Store.open(cfg_a.peers[0].vault)
    send, recv = build_key_provider(cfg_a.peers[0].keys), build_key_provider(cfg_b.keys)
    r = Rig(lab, unique, options, store, send, recv, workdir, [])
    try:
        yield r
    finally:
        for data_dir in r.clusters:
            with contextlib.suppress(Exception):
                await standby.stop(options, data_dir)
        await send.aclose()
        await recv.aclose()
        await store.aclose()
        shutil.rmtree(workdir, ignore_errors=True)


async def fetchval(dsn: str, query: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def start_copy(rig: Rig, data_dir: Path) -> str:
    """Start an extracted backup on a free port (crash recovery from its own WAL); its DSN."""
    port = free_port()
    settings = {
        "port": str(port),
        "listen_addresses": "'127.0.0.1'",
        "unix_socket_directories": "''",
        "archive_mode": "off",
        "synchronous_standby_names": "''",
    }
    auto = data_dir / "postgresql.auto.conf"
    text = auto.read_text() if auto.exists() else ""
    auto.write_text(text + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    user = pwd.getpwnam(rig.options.os_user)
    os.chown(auto, user.pw_uid, user.pw_gid)
    rig.clusters.append(data_dir)
    await standby.start(rig.options, data_dir)
    return f"postgresql://dragent@127.0.0.1:{port}/app"


@pytest.mark.lab
async def test_second_backup_ships_only_what_changed(rig: Rig) -> None:
    primary, table = rig.lab.pg_dsn("a"), "t_" + rig.stream.replace("-", "_")
    conn = await asyncpg.connect(primary)
    try:
        await conn.execute(
            f"CREATE TABLE {table} (id int PRIMARY KEY, bid int, abalance int, filler char(84))"
        )
        await conn.execute(
            f"INSERT INTO {table} SELECT i, i / 100000, 0, '' FROM generate_series(1, {ROWS}) i"
        )
        await conn.execute("CHECKPOINT")
        first = await rig.backup()
        lo, hi = ROWS // 3, ROWS // 3 + ROWS // 20 - 1  # a contiguous 5 %
        await conn.execute(
            f"UPDATE {table} SET abalance = abalance + 7 WHERE id BETWEEN {lo} AND {hi}"
        )
        await conn.execute("CHECKPOINT")
        second = await rig.backup()
    finally:
        await conn.close()
    own = backup_prefix(rig.stream, second.id)
    new_packs = [p for p in second.parts if p["key"].startswith(own)]
    new_plain = sum(p["size"] for p in new_packs)
    print(
        f"\nbackup 1: {first.bytes} bytes logical, {first.stored} stored in "
        f"{len(first.parts)} packs; backup 2: {second.bytes} bytes logical, "
        f"{second.stored} newly stored ({second.stored / first.bytes:.1%} of backup 1), "
        f"{len(new_packs)} new packs of {len(second.parts)} "
        f"holding {new_plain} bytes before compression ({new_plain / first.bytes:.1%})"
    )
    assert first.version == second.version == 2
    assert second.stored <= 0.15 * first.bytes
    assert new_plain <= 0.15 * first.bytes  # not only thanks to zstd
    # the second backup reads packs of the first: every key it needs is named
    assert any(k.startswith(backup_prefix(rig.stream, first.id)) for k in backup_keys(second))
    listed = {info.key async for info in rig.store.list(backup_prefix(rig.stream))}
    assert backup_keys(second) <= listed and backup_keys(first) <= listed

    data_dir = rig.empty_dir("restored")
    await extract_backup(rig.options, rig.store, rig.recv_keys, second, data_dir)  # verifies
    copy = await start_copy(rig, data_dir)
    query = (
        f"SELECT md5(string_agg(id || ':' || abalance, ',' ORDER BY id)) FROM {table} "
        f"WHERE id BETWEEN {lo - 10} AND {hi + 10}"
    )
    assert await fetchval(copy, query) == await fetchval(primary, query)
    total = f"SELECT count(*) || '/' || sum(abalance) FROM {table}"
    assert (
        await fetchval(copy, total)
        == await fetchval(primary, total)
        == f"{ROWS}/{7 * (hi - lo + 1)}"
    )


@pytest.mark.lab
async def test_backup_in_the_first_format_still_extracts(rig: Rig) -> None:
    """A vault written before version 2: parts of the tar stream, a manifest without a version."""
    made = await rig.backup()
    await asyncio.sleep(max(0.0, int(made.start_time) + 1.05 - time.time()))
    old_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    prefix, name = backup_prefix(rig.stream, old_id), sealed_name(rig.stream, old_id)
    parts: list[dict[str, object]] = []
    held = bytearray()

    async def put_part() -> None:
        seq = len(parts) + 1
        key = f"{prefix}part-{seq:08d}.seg"
        blob, root = await seal_put(rig.store, rig.send_keys, key, name, seq, bytes(held))
        parts.append({"key": key, "size": len(held), "stored": len(blob), "root": root.hex()})
        held.clear()

    async with contextlib.aclosing(
        chunk_blocks(rig.store, rig.recv_keys, rig.stream, made.parts, made.chunks)
    ) as blocks:
        async for views in blocks:
            for view in views:
                held.extend(view)
            if len(held) >= 8 << 20:
                await put_part()
    await put_part()
    old = {
        "id": old_id, "stream": rig.stream, "timeline": made.timeline,
        "start_lsn": json.loads(made.to_json())["start_lsn"],
        "end_lsn": json.loads(made.to_json())["end_lsn"],
        "start_time": time.time(), "end_time": time.time(), "parts": parts,
        "bytes": made.bytes,
    }  # fmt: skip
    await seal_put(
        rig.store, rig.send_keys, prefix + "manifest.seg", name, 0, json.dumps(old).encode()
    )
    newest = (await list_backups(rig.store, rig.recv_keys, rig.stream))[-1]
    assert newest.id == old_id and newest.version == 1 and len(newest.parts) == len(parts)
    assert backup_keys(newest) == {prefix + "manifest.seg", *(p["key"] for p in parts)}
    await extract_backup(rig.options, rig.store, rig.recv_keys, newest, rig.empty_dir("old"))
    # and the next backup after it is whole again (nothing of a first-format backup is reused)
    after = await rig.backup()
    assert all(p["key"].startswith(backup_prefix(rig.stream, after.id)) for p in after.parts)


@pytest.mark.lab
async def test_a_corrupted_pack_or_chunk_fails_extraction(rig: Rig) -> None:
    made = await rig.backup()
    # a chunk whose bytes are not what the manifest says (the pack itself is sound)
    chunks = list(made.chunks)
    chunks[len(chunks) // 2] = chunks[len(chunks) // 2]._replace(id="0" * 64)
    with pytest.raises(IntegrityError, match="chunk at"):
        await extract_backup(
            rig.options, rig.store, rig.recv_keys, replace(made, chunks=chunks),
            rig.empty_dir("wrong-chunk"),
        )  # fmt: skip
    # one byte changed in a stored pack
    key = made.parts[len(made.parts) // 2]["key"]
    assert parse_pack_key(key)[1] == made.id
    blob = bytearray(await rig.store.get(key))
    blob[len(blob) // 2] ^= 0x01
    await rig.store.put(key, bytes(blob))
    with pytest.raises(IntegrityError):
        await extract_backup(
            rig.options, rig.store, rig.recv_keys, made, rig.empty_dir("corrupt-pack")
        )
    # a pack the next backup would reuse is gone (a collector breaking the rule): that
    # backup fails rather than publish a manifest naming it
    await rig.store.delete(made.parts[0]["key"])
    with pytest.raises(SourceError, match="left the vault"):
        await rig.backup()
    assert [b.id for b in await list_backups(rig.store, rig.recv_keys, rig.stream)] == [made.id]


@pytest.mark.lab
async def test_every_nth_backup_is_full_so_retention_can_free_old_packs(rig: Rig) -> None:
    """With backup_full_every = 2, a backup whose base already reads two backups' packs is
    full: no backup reads packs further back than that, so expiring old ones frees them."""
    rig.options = rig.options.model_copy(update={"backup_full_every": 2})
    first = await rig.backup()
    second = await rig.backup()
    third = await rig.backup()
    fourth = await rig.backup()
    assert backups_read(first) == {first.id}
    assert backups_read(second) == {first.id, second.id}  # incremental on the first
    assert backups_read(third) == {third.id}  # its base reads two backups: full
    assert backups_read(fourth) == {third.id, fourth.id}
    assert third.stored > 5 * fourth.stored
