"""Pure parts of the postgres kind: LSN and WAL-file arithmetic, records, clock, wal-fetch."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from replicators.errors import IntegrityError
from replicators.postgres import lsn as L
from replicators.postgres.lsn import LsnClock
from replicators.postgres.restore import RestoreTarget
from replicators.postgres.spool import decode_records
from replicators.postgres.walfetch import FILLING, fetch
from replicators.segment import SegmentHeader

SEG = L.WAL_SEGMENT_SIZE


def test_lsn_round_trip() -> None:
    assert L.parse_lsn("0/16B3748") == 0x16B3748
    assert L.parse_lsn("1/0") == 1 << 32
    assert L.format_lsn(L.parse_lsn("AB/CDEF0123")) == "AB/CDEF0123"
    with pytest.raises(ValueError):
        L.parse_lsn("16B3748")


def test_wal_file_names_match_postgres() -> None:
    assert L.wal_file_name(1, 0x2000028) == "000000010000000000000002"
    assert L.wal_file_name(3, (1 << 32) + 5 * SEG) == "000000030000000100000005"
    assert L.parse_wal_file_name("000000030000000100000005") == (3, (1 << 32) + 5 * SEG)
    assert L.is_history_file("00000002.history")
    with pytest.raises(ValueError):
        L.parse_wal_file_name("00000002.history")


def test_split_at_boundaries() -> None:
    start = SEG - 3
    pieces = L.split_at_boundaries(start, b"abcdefgh")
    assert pieces == [(SEG - 3, b"abc"), (SEG, b"defgh")]


def test_record_round_trip_and_refusals() -> None:
    rec = L.pack_record(2, SEG + 10, b"wal")
    assert L.unpack_record(rec) == (2, SEG + 10, b"wal")
    with pytest.raises(ValueError):
        L.unpack_record(L.pack_record(1, SEG - 1, b"xx"))  # crosses a WAL file
    with pytest.raises(ValueError):
        L.unpack_record(b"short")


def _header(start: int, end: int) -> SegmentHeader:
    return SegmentHeader(
        version=1, stream="s", epoch=1, seq=1, start=str(start), end=str(end),
        first_source_time=0.0, last_source_time=0.0, record_count=0, created_at=0.0,
        key_id="k", wrapped_key=b"", salt=b"", commitment=b"", frame_size=1,
    )  # fmt: skip


def test_decode_records_checks_contiguity() -> None:
    recs = [L.pack_record(1, 100, b"ab"), L.pack_record(1, 102, b"cd")]
    assert [p[1] for p in decode_records(_header(100, 104), recs)] == [100, 102]
    with pytest.raises(IntegrityError):
        decode_records(_header(100, 105), recs)
    with pytest.raises(IntegrityError):
        decode_records(_header(99, 104), recs)


def test_clock_gives_the_newest_sample_at_or_before() -> None:
    clock = LsnClock()
    assert clock.time_at(5) is None
    clock.add(100, 1.0)
    clock.add(200, 2.0)
    assert clock.time_at(150) == 1.0
    assert clock.time_at(200) == 2.0
    clock.forget_before(250)
    assert clock.time_at(260) == 2.0


def test_wal_fetch_serves_only_below_the_applied_end(tmp_path: Path) -> None:
    name = L.wal_file_name(1, SEG)
    (tmp_path / name).write_bytes(b"A" * 100 + b"B" * 100 + bytes(SEG - 200))
    (tmp_path / "state.json").write_text(json.dumps({"end": SEG + 100}))
    dest = tmp_path / "out"
    assert fetch(tmp_path, name, dest) == 0
    data = dest.read_bytes()
    assert len(data) == SEG and data[:100] == b"A" * 100 and data[100:] == bytes(SEG - 100)
    assert fetch(tmp_path, L.wal_file_name(1, 2 * SEG), dest) == 1  # not yet
    assert fetch(tmp_path, "00000002.history", dest) == 1


def test_restore_target_parsing() -> None:
    assert RestoreTarget.parse("latest") == RestoreTarget()
    assert RestoreTarget.parse("0/3000000").lsn == 0x3000000
    t = RestoreTarget.parse("2026-11-28T10:00:00")
    assert t.time == 1795860000.0
    assert "recovery_target_time" in t.settings()


def test_history_records_travel_without_moving_the_position() -> None:
    rec = L.pack_history(2, b"1\t0/3000000\tno recovery target specified\n")
    assert L.unpack_record(rec) == (2, L.HISTORY, rec[12:])
    recs = [rec, L.pack_record(2, 100, b"ab")]
    pieces = decode_records(_header(100, 102), recs)
    assert [p[1] for p in pieces] == [L.HISTORY, 100]
    with pytest.raises(ValueError):
        L.unpack_record(L.pack_history(1, b""))


def test_wal_fetch_waits_for_whole_files_while_a_restore_fills(tmp_path: Path) -> None:
    name = L.wal_file_name(1, SEG)
    (tmp_path / name).write_bytes(b"A" * 100 + bytes(SEG - 100))
    (tmp_path / "state.json").write_text(json.dumps({"end": SEG + 100}))
    (tmp_path / FILLING).touch()
    timer = threading.Timer(0.3, (tmp_path / FILLING).unlink)
    timer.start()
    started = time.monotonic()
    assert fetch(tmp_path, name, tmp_path / "out") == 0
    assert time.monotonic() - started >= 0.25  # held back until the fill was done
    timer.join()


def test_dragent_wal_fetch_command(tmp_path: Path) -> None:
    from agent.cli import main

    name = L.wal_file_name(1, 0)
    (tmp_path / name).write_bytes(bytes(SEG))
    (tmp_path / "state.json").write_text(json.dumps({"end": SEG}))
    assert main(["wal-fetch", name, str(tmp_path / "out"), "--spool", str(tmp_path)]) == 0
    assert (tmp_path / "out").stat().st_size == SEG
    assert main(["wal-fetch", L.wal_file_name(1, SEG), "x", "--spool", str(tmp_path)]) == 1


def test_passwords_travel_in_the_environment_not_on_command_lines() -> None:
    from replicators.postgres.pgtools import conninfo_and_env

    conninfo, env = conninfo_and_env("postgresql://u:s3cret@db.example:5432/app")
    assert "s3cret" not in conninfo and "host=db.example" in conninfo
    assert env["PGPASSWORD"] == "s3cret"


def test_a_base_backup_is_due_after_a_promotion_and_when_none_exists() -> None:
    from replicators.postgres.basebackup import BackupManifest
    from replicators.postgres.kind import backup_due

    newest = BackupManifest("b1", "pg", 2, 0, 1, 1000.0, 1001.0, [], 10)
    assert backup_due(None, 1, 2000.0, 0.0) == "no base backup in the vault"
    assert backup_due(newest, 2, 1e9, 0.0) is None  # no schedule: the one there serves
    assert "timeline 2, the primary's is 3" in (backup_due(newest, 3, 1100.0, 0.0) or "")
    assert backup_due(newest, 2, 1500.0, 3600.0) is None
    assert "backup_every 3600s" in (backup_due(newest, 2, 4600.0, 3600.0) or "")


def test_a_restore_before_the_first_backup_names_the_earliest_point() -> None:
    from replicators.errors import NotFound
    from replicators.postgres.basebackup import BackupManifest, choose_backup

    backups = [
        BackupManifest("b1", "pg", 1, 0x3000000, 0x3000100, 1_800_000_000.0, 1_800_000_060.0,
                       [], 10),
        BackupManifest("b2", "pg", 1, 0x5000000, 0x5000100, 1_800_003_600.0, 1_800_003_660.0,
                       [], 10),
    ]  # fmt: skip
    with pytest.raises(NotFound, match=r"earliest restorable point is 2027-01-15T08:01:00\+00:00"):
        choose_backup(backups, before_time=1_800_000_000.0)
    with pytest.raises(NotFound, match="LSN 0/3000100"):
        choose_backup(backups, before_lsn=0x100)
    with pytest.raises(NotFound, match="holds no base backup of this stream"):
        choose_backup([], before_time=1.0)
    assert choose_backup(backups, before_time=1_800_003_700.0).id == "b2"


async def test_a_restore_to_a_future_time_is_refused_before_anything_is_made(
    tmp_path: Path,
) -> None:
    from replicators.errors import SourceError
    from replicators.postgres.options import PostgresOptions
    from replicators.postgres.restore import restore
    from replicators.settings import Secret

    options = PostgresOptions(dsn=Secret("postgresql://x@127.0.0.1:1/app", "test"))
    target = RestoreTarget(time=time.time() + 3600)
    data = tmp_path / "restored"
    with pytest.raises(SourceError, match="is in the future"):
        await restore(options, "pg", None, None, target=target, data_dir=data, port=1)  # type: ignore[arg-type]
    assert not data.exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None, reason="needs root")
def test_the_standby_runs_wal_fetch_even_from_a_checkout_only_root_may_enter(
    tmp_path: Path,
) -> None:
    """A checkout under a 0700 directory: PostgreSQL (its own OS user) cannot reach the
    checkout's wal-fetch. The restore_command runs a copy beside the spool instead."""
    import importlib.util
    import subprocess

    import replicators.postgres.walfetch as ours

    checkout = tmp_path / "private" / "dragent"
    (checkout / "postgres").mkdir(parents=True)
    (tmp_path / "private").chmod(0o700)
    here = Path(ours.__file__).parent
    for name in ("walfetch.py", "lsn.py"):
        shutil.copyfile(here / name, checkout / "postgres" / name)
    script = checkout / "postgres" / "walfetch.py"
    spec = importlib.util.spec_from_file_location("walfetch_copy", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shared = Path(tempfile.mkdtemp(prefix="dragent-walfetch-"))
    try:
        shared.chmod(0o755)
        spool = shared / "spool"
        spool.mkdir()
        spool.chmod(0o755)
        command = module.restore_command(spool)
        assert str(checkout) not in command
        line = command.replace("%f", "000000010000000000000001").replace("%p", "/dev/null")
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", "sh", "-c", line],
            capture_output=True, text=True, timeout=30, cwd="/",
        )  # fmt: skip
        # an empty spool: "not yet" (exit 1), never "permission denied" (exit 2)
        assert done.returncode == 1, done.stderr
        assert "Permission denied" not in done.stderr
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_gap_records_move_the_position_and_are_checked() -> None:
    gap = L.pack_gap(3, 100, 4 * SEG)
    assert L.unpack_record(gap) == (3, L.GAP, gap[12:])
    recs = [gap, L.pack_record(3, 4 * SEG, b"ab")]
    assert [p[1] for p in decode_records(_header(100, 4 * SEG + 2), recs)] == [L.GAP, 4 * SEG]
    with pytest.raises(IntegrityError, match="gap record from"):
        decode_records(_header(99, 4 * SEG + 2), recs)  # it must begin where the log stood
    for bad in (L.pack_gap(3, 200, 100), L.pack_gap(0, 1, 2), gap + b"x"):
        with pytest.raises(ValueError):
            L.unpack_record(bad)


def test_a_spool_applies_a_gap_and_remembers_it(tmp_path: Path) -> None:
    import asyncio

    from replicators.postgres.spool import WalSpool, load_state
    from replicators.vault import SegmentRef

    spool = WalSpool(tmp_path / "spool")
    recs = [L.pack_gap(2, 100, SEG), L.pack_record(2, SEG, b"ab")]
    asyncio.run(spool.apply(SegmentRef(1, 7, "s"), _header(100, SEG + 2), recs))
    state = load_state(spool.directory)
    assert state is not None and state["end"] == SEG + 2 and state["timeline"] == 2
    assert state["gap"] == {"from": 100, "to": SEG, "seq": 7}
    assert sorted(p.name for p in spool.directory.iterdir()) == [
        L.wal_file_name(2, SEG),
        "state.json",
    ]


def test_open_gaps_make_a_backup_due_until_one_starts_after_them(tmp_path: Path) -> None:
    from replicators.postgres import gaps
    from replicators.postgres.basebackup import BackupManifest
    from replicators.postgres.kind import backup_due

    book = gaps.GapBook(tmp_path, "pg", "b")
    book.add(gaps.Gap("pg", "b", "dragent_b", SEG, 3 * SEG, 1, 500.0, 900.0, "slot dropped"))
    book.add(gaps.Gap("other", "b", "dragent_b", SEG, 3 * SEG, 1, 1.0, 2.0, "another stream"))
    [gap] = book.gaps()
    assert book.unrestorable_since() == 500.0
    old = BackupManifest("b1", "pg", 1, 0, 1, 100.0, 101.0, [], 10)
    assert "gap (0/1000000 to 0/3000000)" in (backup_due(old, 1, 1000.0, 0.0, [gap]) or "")
    new = BackupManifest("b2", "pg", 1, 3 * SEG, 3 * SEG + 5, 1000.0, 1001.0, [], 10)
    assert backup_due(new, 1, 1002.0, 0.0, [gap]) is None
    assert gaps.cover(tmp_path, book.gaps(), "b1", old.start_lsn) == []  # starts before it
    [covered] = gaps.cover(tmp_path, book.gaps(), "b2", new.start_lsn)
    book.forget()
    assert covered.covered_by == "b2" and book.gaps()[0].covered_by == "b2"
    assert book.unrestorable_since() is None
    assert gaps.load(tmp_path, "other")[0].covered_by is None  # another stream's gap stays


def test_the_rpo_never_counts_from_after_an_uncovered_gap() -> None:
    from replicators.progress import StreamProgress

    floor: list[float | None] = [None]
    p = StreamProgress("pg", "postgres", "source", "b", source_floor=lambda: floor[0])
    p.resumed(10, 100.0, 100.0)
    p.step_done(began=200.0)
    assert p.rpo(200.5) == pytest.approx(0.5)
    floor[0] = 150.0  # the vault cannot restore past what was durable at 150
    assert p.rpo(200.5) == pytest.approx(50.5)
    assert p.rpo(260.0) == pytest.approx(110.0)  # and it grows with wall time
