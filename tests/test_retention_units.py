"""Retention's plan, without a vault: what the recovery window keeps, in what order."""

from __future__ import annotations

import time
from typing import Any

from replicators.postgres.basebackup import BackupManifest
from replicators.postgres.retention import floor_backup, oldest_point, plan
from replicators.settings import RetentionConfig
from replicators.vault import SegmentRef

DAY = 86400.0
NOW = 100 * DAY


def bid(t: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


def backup(i: int, end_time: float, start_lsn: int) -> BackupManifest:
    backup_id = bid(end_time - 60)
    parts: list[dict[str, Any]] = [
        {"key": f"backups/s/{backup_id}/part-00000001.seg", "size": 1, "root": "0" * 32}
    ]
    return BackupManifest(
        id=backup_id, stream="s", timeline=1, start_lsn=start_lsn,
        end_lsn=start_lsn + 10, start_time=end_time - 60, end_time=end_time, parts=parts,
        bytes=1,
    )  # fmt: skip


def keys_of(b: BackupManifest) -> set[str]:
    return {f"backups/s/{b.id}/manifest.seg"} | {p["key"] for p in b.parts}


BACKUPS = [backup(i, NOW - (10 - i) * DAY, i * 1000) for i in range(10)]  # one a day
SEGS = [SegmentRef(1, seq, "s") for seq in range(1, 101)]


def test_the_floor_is_the_newest_backup_that_ends_by_the_window_start() -> None:
    week = RetentionConfig(window=7 * DAY, keep_backups=1)
    i = floor_backup(BACKUPS, NOW, week)
    assert BACKUPS[i].end_time <= NOW - 7 * DAY < BACKUPS[i + 1].end_time
    # keep_backups only moves it back; a window of 0 keeps everything
    assert floor_backup(BACKUPS, NOW, RetentionConfig(window=7 * DAY, keep_backups=9)) == 1
    assert floor_backup(BACKUPS, NOW, RetentionConfig(window=0, keep_backups=1)) == 0
    # no backup ends before the window: all are needed
    assert floor_backup(BACKUPS, NOW, RetentionConfig(window=50 * DAY, keep_backups=1)) == 0


def prefixes(*extra: str) -> dict[str, list[str]]:
    out = {b.id: sorted(keys_of(b)) for b in BACKUPS}
    for backup_id in extra:
        out[backup_id] = [f"backups/s/{backup_id}/part-00000001.seg"]
    return out


def test_the_plan_deletes_manifests_first_then_old_segments_then_parts() -> None:
    week = RetentionConfig(window=7 * DAY, keep_backups=1)
    cut = SEGS[40]
    todo = plan("s", BACKUPS, prefixes(), SEGS, cut, NOW, week, keys_of)
    assert todo.floor is BACKUPS[3] and todo.kept_backups == [b.id for b in BACKUPS[3:]]
    kinds = [k for k, _ in todo.steps()]
    assert kinds == sorted(kinds, key=["manifest", "segment", "backup object"].index)
    assert todo.manifests == [f"backups/s/{b.id}/manifest.seg" for b in BACKUPS[:3]]
    assert todo.segments == SEGS[:40]  # everything before the cut, nothing from it
    assert todo.objects == [p["key"] for b in BACKUPS[:3] for p in b.parts]
    kept = set().union(*(keys_of(b) for b in BACKUPS[3:]))
    assert not kept & {k for _, k in todo.steps()}


def test_segments_wait_for_the_standby_and_the_newest_is_never_deleted() -> None:
    week = RetentionConfig(window=7 * DAY, keep_backups=1)
    applied = SEGS[9]
    todo = plan("s", BACKUPS, prefixes(), SEGS, SEGS[40], NOW, week, keys_of, applied=applied)
    assert todo.segments == SEGS[:10]
    held = plan("s", BACKUPS, prefixes(), SEGS, SEGS[40], NOW, week, keys_of, hold_segments=True)
    assert held.segments == [] and held.manifests  # backups still go
    # the floor's WAL lies past every segment: all but the newest may go
    todo = plan("s", BACKUPS, prefixes(), SEGS, None, NOW, week, keys_of)
    assert todo.segments == SEGS[:-1]


def test_a_backup_in_progress_is_left_alone_and_an_old_orphan_collected() -> None:
    week = RetentionConfig(window=7 * DAY, keep_backups=1, orphan_grace=DAY)
    young, old = bid(NOW - 60), bid(NOW - 50 * DAY)  # began a minute, 50 days ago
    todo = plan("s", BACKUPS, prefixes(young, old, "not-a-time"), SEGS, SEGS[40], NOW, week,
                keys_of)  # fmt: skip
    assert sorted(todo.in_progress) == sorted([young, "not-a-time"])
    assert f"backups/s/{old}/part-00000001.seg" in todo.objects
    assert not any(young in k for k in todo.objects)


def test_a_kept_incremental_backup_keeps_the_packs_it_borrows() -> None:
    week = RetentionConfig(window=7 * DAY, keep_backups=1)
    borrowed = f"backups/s/{BACKUPS[0].id}/part-00000001.seg"
    parts = [*BACKUPS[5].parts, {"key": borrowed, "size": 1, "root": "0" * 32}]
    newest = BackupManifest(**{**BACKUPS[5].__dict__, "parts": parts, "bytes": 2})
    backups = [*BACKUPS[:5], newest, *BACKUPS[6:]]
    todo = plan("s", backups, prefixes(), SEGS, SEGS[40], NOW, week, keys_of)
    assert borrowed not in todo.objects
    assert f"backups/s/{BACKUPS[1].id}/part-00000001.seg" in todo.objects


def test_the_oldest_point_is_the_oldest_backup_joined_to_the_log() -> None:
    assert oldest_point(BACKUPS, None) is None
    assert oldest_point(BACKUPS, 0) is BACKUPS[0]
    assert oldest_point(BACKUPS, 3005) is BACKUPS[3]  # backup 2's WAL is gone
    assert oldest_point(BACKUPS, 10**9) is None
