"""Retention on the lab: the collector keeps every restore point of the window, even when
killed with SIGKILL mid-pass, and leaves what Object Lock protects.

Region a's primary ships a PostgreSQL stream into region b's vault (SeaweedFS) with
three base backups taken a few seconds apart; the window is set so that the second
backup is the oldest one needed. Ground truth is what the writer saw committed.
"""

# ruff: noqa: F811 - ``pg`` is test_postgres_lab's fixture, imported to be shared

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import signal
import sys
import time
import tomllib
from pathlib import Path

import asyncpg
import pytest
import tomli_w

from replicators.errors import NotFound
from replicators.postgres import gc
from replicators.postgres.basebackup import list_backups, take_backup
from replicators.postgres.restore import RestoreTarget, restore
from replicators.s3 import S3Store, s3_client
from replicators.settings import RetentionConfig
from tests.support import eventually
from tests.test_postgres_lab import (  # noqa: F401 - pg is a fixture
    PgRig,
    current_lsn,
    execute,
    free_port,
    insert_range,
    pg,
    running,
    table_of,
)

pytestmark = pytest.mark.lab


async def history(pg: PgRig) -> dict[str, float]:
    """Three backups, rows 0..399 in four batches; returns the moments between them."""
    table, primary = table_of(pg), pg.lab.pg_dsn("a")
    await execute(primary, f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    shipper = pg.shipper()
    marks: dict[str, float] = {}
    async with running(shipper):
        await insert_range(primary, table, 0, 100)
        await take_backup(pg.options, pg.stream.name, pg.store, pg.send_keys)
        for lo in range(100, 200, 5):  # many small segments between the first two backups
            await insert_range(primary, table, lo, lo + 5)
            await asyncio.sleep(0.12)
        await asyncio.sleep(1.0)
        await take_backup(pg.options, pg.stream.name, pg.store, pg.send_keys)
        await asyncio.sleep(1.0)
        marks["window_start"] = time.time()  # rows 0..199 committed, 200.. not yet
        await asyncio.sleep(1.0)
        for i in range(2, 4):  # many small segments after the second backup
            for j in range(10):
                lo = i * 100 + j * 10
                await insert_range(primary, table, lo, lo + 10)
                await asyncio.sleep(0.15)
            if i == 2:
                await asyncio.sleep(1.1)  # a third backup, more than a second later
                await take_backup(pg.options, pg.stream.name, pg.store, pg.send_keys)
        end = await current_lsn(primary)
        await eventually(lambda: shipper.end >= end, within=20)
    return marks


def policy_for(marks: dict[str, float]) -> RetentionConfig:
    """A window whose start is ``window_start`` at the time of the call. Its start moves
    on with time; keeping two backups keeps the second one the floor all the same."""
    return RetentionConfig(window=time.time() - marks["window_start"], keep_backups=2)


async def restored_ids(pg: PgRig, target: RestoreTarget, name: str) -> set[int]:
    data_dir = pg.workdir / name
    pg.clusters.append(data_dir)
    port = free_port()
    await restore(
        pg.options, pg.stream.name, pg.store, pg.recv_keys,
        target=target, data_dir=data_dir, port=port,
    )  # fmt: skip
    conn = await asyncpg.connect(f"postgresql://dragent@127.0.0.1:{port}/app")
    try:
        return {r[0] for r in await conn.fetch(f"SELECT id FROM {table_of(pg)}")}
    finally:
        await conn.close()


async def keys_under(pg: PgRig, prefix: str) -> list[str]:
    return [i.key async for i in pg.store.list(prefix)]


async def test_gc_keeps_the_window_restorable_and_removes_what_is_older(pg: PgRig) -> None:
    marks = await history(pg)
    name = pg.stream.name
    before = await list_backups(pg.store, pg.recv_keys, name)
    segments_before = await keys_under(pg, f"streams/{name}/")
    assert len(before) == 3

    dry = await gc.collect(pg.store, pg.recv_keys, name, policy_for(marks), dry_run=True)
    assert dry.deleted.get("manifest") == 1 and dry.deleted.get("segment", 0) > 0
    assert await keys_under(pg, f"streams/{name}/") == segments_before  # a dry run deletes nothing

    result = await gc.collect(pg.store, pg.recv_keys, name, policy_for(marks))
    assert result.floor_backup == before[1].id and result.kept_backups == [b.id for b in before[1:]]
    assert result.deleted["manifest"] == 1 and result.deleted["segment"] == dry.deleted["segment"]
    kept = await list_backups(pg.store, pg.recv_keys, name)
    assert [b.id for b in kept] == result.kept_backups
    # of the first backup, only what a kept (incremental) backup still reads is left
    needed = set().union(*(gc.default_keys(b) for b in kept))
    left = set(await keys_under(pg, f"backups/{name}/{before[0].id}/"))
    assert left <= needed and f"backups/{name}/{before[0].id}/manifest.seg" not in left
    assert result.oldest_point == pytest.approx(before[1].end_time)
    assert result.recovery_window >= time.time() - marks["window_start"] - 1
    print(
        f"\ngc: deleted {result.deleted}, {result.bytes_deleted} bytes; left {result.vault_objects}"
    )

    # the window's oldest point and the latest point, against what was committed
    assert await restored_ids(pg, RestoreTarget(time=marks["window_start"]), "oldest") == set(
        range(200)
    )
    assert await restored_ids(pg, RestoreTarget(), "latest") == set(range(400))
    # a point before the window is refused, naming the earliest restorable point
    with pytest.raises(NotFound, match="earliest restorable point"):
        await restored_ids(pg, RestoreTarget(time=before[0].end_time + 0.5), "too-old")
    # a second pass finds nothing more to delete
    again = await gc.collect(pg.store, pg.recv_keys, name, policy_for(marks))
    assert not again.deleted


def gc_config(pg: PgRig, marks: dict[str, float]) -> Path:
    """Region b's configuration with the stream and a retention whose window starts at
    ``window_start`` when written (as ``policy_for``)."""
    data = tomllib.loads(pg.lab.config_path("b").read_text())
    data["data_dir"] = str(pg.workdir / "agent-b")
    window = time.time() - marks["window_start"]
    postgres = {"dsn": "env:UNUSED_DSN", "slot": pg.options.slot}
    data["streams"] = [
        {"name": pg.stream.name, "kind": "postgres", "postgres": postgres,
         "retention": {"window": f"{window:.3f}s", "keep_backups": 2}}
    ]  # fmt: skip
    path = pg.workdir / "b-gc.toml"
    path.write_text(tomli_w.dumps(data))
    return path


async def test_gc_killed_at_random_points_leaves_the_window_restorable(pg: PgRig) -> None:
    marks = await history(pg)
    name = pg.stream.name
    config = gc_config(pg, marks)
    env = {**os.environ, "UNUSED_DSN": "postgresql://unused@127.0.0.1:1/x"}
    total = len(await keys_under(pg, f"streams/{name}/")) + len(
        await keys_under(pg, f"backups/{name}/")
    )
    plan = await gc.collect(pg.store, pg.recv_keys, name, policy_for(marks), dry_run=True)
    to_delete = sum(plan.deleted.values())
    assert to_delete >= 15, plan.deleted
    rng = random.Random(int(os.environ.get("GC_KILL_SEED", "7")))
    err = pg.workdir / "gc.err"
    kills: list[int] = []
    for _ in range(3):
        count = len(await keys_under(pg, f"streams/{name}/")) + len(
            await keys_under(pg, f"backups/{name}/")
        )
        left = to_delete - (total - count)
        print(f"\n{left} of {to_delete} left to delete")
        if left <= 1:
            break
        stop_after = rng.randint(1, left - 1)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "vault", "gc", "--config", str(config),
            "--stream", name, "--json",
            stdout=asyncio.subprocess.DEVNULL, stderr=err.open("ab"), env=env,
        )  # fmt: skip
        try:
            async with asyncio.timeout(60):
                while True:  # SIGKILL once it has deleted stop_after objects
                    now = len(await keys_under(pg, f"streams/{name}/")) + len(
                        await keys_under(pg, f"backups/{name}/")
                    )
                    if count - now >= stop_after or proc.returncode is not None:
                        break
                    await asyncio.sleep(0.005)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            await proc.wait()
        kills.append(count - now)
        # after every kill, both ends of the window restore to the ground truth
        assert await restored_ids(pg, RestoreTarget(time=marks["window_start"]), "o") == set(
            range(200)
        )
        assert await restored_ids(pg, RestoreTarget(), "l") == set(range(400))
        for d in ("o", "l"):
            await _drop(pg, d)
    assert any(0 < k < to_delete for k in kills), (kills, err.read_text()[-2000:])
    print(f"\nkilled after deleting {kills} of {to_delete} objects ({plan.deleted})")
    # the next pass finishes the job
    result = await gc.collect(pg.store, pg.recv_keys, name, policy_for(marks))
    assert [b.id for b in await list_backups(pg.store, pg.recv_keys, name)] == result.kept_backups
    assert len(result.kept_backups) == 2


async def _drop(pg: PgRig, name: str) -> None:
    """Stop and remove a restored cluster so the next restore can use the name."""
    from replicators.postgres import standby

    data_dir = pg.workdir / name
    with contextlib.suppress(Exception):
        await standby.stop(pg.options, data_dir)
    await asyncio.to_thread(_rmtree, data_dir)
    pg.clusters.remove(data_dir)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


async def test_gc_skips_and_reports_what_object_lock_protects(pg: PgRig) -> None:
    marks = await history(pg)
    name = pg.stream.name
    plan = await gc.collect(pg.store, pg.recv_keys, name, policy_for(marks), dry_run=True)
    segments = await keys_under(pg, f"streams/{name}/")
    # lock the two oldest segments (a versioned bucket with Object Lock: the lab's vault is
    # not one, so the test makes its own and copies the stream into it)
    locked_store = await _locked_copy(pg, segments[:2])
    try:
        result = await gc.collect(locked_store, pg.recv_keys, name, policy_for(marks))
        assert sorted(result.locked) == sorted(segments[:2])
        assert result.deleted["segment"] == plan.deleted["segment"] - 2
        for key in segments[:2]:  # still there, every version
            await locked_store.stat(key)
        # no error loop: the next pass skips them again and deletes nothing else
        again = await gc.collect(locked_store, pg.recv_keys, name, policy_for(marks))
        assert sorted(again.locked) == sorted(segments[:2]) and not again.deleted
    finally:
        await locked_store.aclose()


async def _locked_copy(pg: PgRig, lock: list[str]) -> S3Store:
    """A bucket with Object Lock holding a copy of the stream's objects; ``lock`` keys
    written under a GOVERNANCE retention of ten minutes."""
    cfg = pg.store.cfg.model_copy(update={"bucket": f"lock-{time.time_ns() % 10**12}"})
    until = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
    async with s3_client(cfg) as s3:
        await s3.create_bucket(Bucket=cfg.bucket, ObjectLockEnabledForBucket=True)
        for prefix in (f"streams/{pg.stream.name}/", f"backups/{pg.stream.name}/"):
            async for info in pg.store.list(prefix):
                body = await pg.store.get(info.key)
                extra = {}
                if info.key in lock:
                    extra = {"ObjectLockMode": "GOVERNANCE", "ObjectLockRetainUntilDate": until}
                await s3.put_object(Bucket=cfg.bucket, Key=info.key, Body=body, **extra)
    return await S3Store.open(cfg)


async def test_a_gc_during_a_restore_keeps_what_the_restore_reads(pg: PgRig) -> None:
    marks = await history(pg)
    name = pg.stream.name
    backups = await list_backups(pg.store, pg.recv_keys, name)
    # a policy that keeps only the newest backup: the restore's own backup would go
    tight = RetentionConfig(window=1.0, keep_backups=1)
    alone = await gc.collect(pg.store, pg.recv_keys, name, tight, dry_run=True)
    assert alone.floor_backup == backups[-1].id and alone.deleted.get("manifest") == 2
    target = RestoreTarget(time=marks["window_start"])  # needs the second backup
    data_dir = pg.workdir / "during"
    pg.clusters.append(data_dir)
    port = free_port()
    restoring = asyncio.create_task(
        restore(
            pg.options, name, pg.store, pg.recv_keys, target=target, data_dir=data_dir, port=port
        )
    )
    await eventually(lambda: _has_lease(pg, name), within=10)
    during = await gc.collect(pg.store, pg.recv_keys, name, tight)
    assert during.leases and during.floor_backup == backups[1].id
    assert backups[1].id in during.kept_backups
    await restoring
    conn = await asyncpg.connect(f"postgresql://dragent@127.0.0.1:{port}/app")
    try:
        ids = {r[0] for r in await conn.fetch(f"SELECT id FROM {table_of(pg)}")}
    finally:
        await conn.close()
    assert ids == set(range(200))
    # the restore is over, its lease gone: the next collection applies the policy
    assert not await keys_under(pg, f"leases/{name}/")
    after = await gc.collect(pg.store, pg.recv_keys, name, tight)
    assert after.floor_backup == backups[-1].id and not after.leases


async def _has_lease(pg: PgRig, name: str) -> bool:
    return bool(await keys_under(pg, f"leases/{name}/"))
