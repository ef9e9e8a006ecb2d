"""The vault scrub and ``vault verify --repair``.

Pure parts first (``replicators.postgres.repair``: which ranges, which records);
then, on the lab (real PostgreSQL and SeaweedFS), a postgres stream shipped into
region b's vault, four segments damaged (three flipped bytes, one deleted),
named by ``vault verify``, repaired from the primary's pg_wal and decoded back
into the primary's exact WAL bytes; a range whose WAL the primary no longer has
is reported unrepairable; and the scrub job stepped over a vault with one bad
segment, restarted from its checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry, generate_latest

from agent.config import AgentConfig, ConfigError, StreamConfig, SyntheticOptions, parse_config
from agent.lab import Lab
from agent.lab.stream_rig import lab_shipper
from agent.scrub import Scrub, ScrubStats, discover_streams
from agent.vaultcmd import vault_verify
from replicators.keys import KeyProvider, build_key_provider
from replicators.logread import LogWalk
from replicators.metrics import Metrics
from replicators.postgres import lsn as L
from replicators.postgres import repair as R
from replicators.postgres.options import PostgresOptions
from replicators.postgres.spool import WalSpool, decode_records
from replicators.postgres.walsource import WalSource
from replicators.progress import StreamProgress
from replicators.s3 import S3Store
from replicators.segment import SegmentHeader
from replicators.settings import Secret
from replicators.shipper import Shipper, ShipperSettings
from replicators.synthetic import SyntheticSource
from replicators.vault import SegmentRef, Vault
from tests.support import eventually

MiB = 1 << 20


# -- pure: replicators.postgres.repair ----------------------------------------------------


def ref(seq: int, epoch: int = 1) -> SegmentRef:
    return SegmentRef(epoch, seq, "s")


def good(seq: int, start: int, end: int, tli: int = 1, epoch: int = 1) -> R.Entry:
    return R.Entry(ref(seq, epoch), str(start), str(end), start / 10, end / 10, tli, tli)


def test_plan_names_unreadable_and_missing_runs_with_the_neighbours_range() -> None:
    entries = [
        good(1, 0, 100),
        R.Entry(ref(2)),  # unreadable
        good(3, 200, 300),
        # seq 4 missing, 5 unreadable: one run
        R.Entry(ref(5)),
        good(6, 500, 600),
        good(8, 700, 800),  # seq 7 missing
    ]
    runs = R.plan(entries)
    assert [r.keys for r in runs] == [[ref(2).key], [ref(4).key, ref(5).key], [ref(7).key]]
    assert [(r.start, r.end) for r in runs] == [("100", "200"), ("300", "500"), ("600", "700")]
    assert [r.missing for r in runs] == [(), (ref(4),), (ref(7),)]
    assert all(r.problem is None and r.timeline == 1 for r in runs)
    # the replacement's source times are the bounds the neighbours prove
    assert (runs[0].first_source_time, runs[0].last_source_time) == (10.0, 20.0)
    assert runs[1].pieces() == [(300, 400), (400, 500)]


def test_plan_refuses_what_it_cannot_bound() -> None:
    runs = R.plan([R.Entry(ref(1)), good(2, 100, 200), R.Entry(ref(3))])
    assert [r.problem for r in runs] == [
        "it begins the log: where it starts is unknown",
        "it ends the log: where it ends is unknown",
    ]
    switch = R.plan([good(1, 0, 100, tli=1), R.Entry(ref(2)), good(3, 200, 300, tli=2)])
    assert switch[0].problem == "the timeline changes inside it (1 before, 2 after)"
    across = R.plan([good(1, 0, 100), good(3, 200, 300, epoch=2)])
    assert across[0].problem is not None and "epoch is unknown" in across[0].problem
    # the timeline comes from further neighbours when the next holds no WAL
    empty = R.Entry(ref(3), "200", "200", 0, 0, None, None)
    assert R.plan([good(1, 0, 100, tli=3), R.Entry(ref(2)), empty])[0].timeline == 3


def test_split_range_never_crosses_a_wal_file() -> None:
    w = L.WAL_SEGMENT_SIZE
    assert R.split_range(w - 10, w + 10, 2) == [(w - 10, w), (w, w + 10)]
    assert R.split_range(w - 10, w + 10, 3) == [(w - 10, w - 5), (w - 5, w), (w, w + 10)]
    assert R.split_range(5, 6, 3) == [(5, 6), (6, 6), (6, 6)]
    with pytest.raises(ValueError, match="spans 3 WAL files"):
        R.split_range(w - 1, 2 * w + 1, 2)


def page(addr: int) -> bytes:
    """A fake WAL page: a header naming ``addr``, then filler."""
    head = (0xD116).to_bytes(2, "little") + bytes(6) + addr.to_bytes(8, "little")
    return head + bytes([addr // R.WAL_PAGE_SIZE % 251]) * (R.WAL_PAGE_SIZE - len(head))


def test_wal_bytes_checks_every_page_address_and_records_decode() -> None:
    base = 3 * L.WAL_SEGMENT_SIZE
    start, end = base + 100, base + 2 * R.WAL_PAGE_SIZE + 50
    offset, length = R.read_span(start, end)
    assert (offset, length) == (0, end - base)
    data = (page(base) + page(base + R.WAL_PAGE_SIZE) + page(base + 2 * R.WAL_PAGE_SIZE))[:length]
    wal = R.wal_bytes(start, end, data)
    assert wal == data[100:] and len(wal) == end - start
    recycled = page(base) + page(base + 7 * R.WAL_PAGE_SIZE) + page(base)
    with pytest.raises(ValueError, match="recycled"):
        R.wal_bytes(start, end, recycled[:length])
    with pytest.raises(ValueError, match="expected"):
        R.wal_bytes(start, end, data[:-1])
    records = R.build_records(2, start, wal)
    assert len(records) == 1 and L.unpack_record(records[0]) == (2, start, wal)
    header = SegmentHeader(
        version=1, stream="s", epoch=1, seq=1, start=str(start), end=str(end),
        first_source_time=0, last_source_time=0, record_count=len(records), created_at=0,
        key_id="k", wrapped_key=b"", salt=b"", commitment=b"", frame_size=1 << 20,
    )  # fmt: skip
    assert decode_records(header, records) == [(2, start, wal)]
    big = R.build_records(1, base, bytes(3 * R.RECORD_BYTES + 1))
    assert [len(r) - 12 for r in big] == [R.RECORD_BYTES] * 3 + [1]


def test_scrub_pace_is_the_slowest_of_its_three_limits(tmp_path: Path) -> None:
    from agent.config import ScrubConfig
    from agent.scrub import MAX_WAIT, Pass

    rates = ScrubConfig()  # a pass a day, 20 segments/s, 4 MiB/s
    scrub = Scrub(None, None, tmp_path / "s.json", rates)  # type: ignore[arg-type]
    assert scrub.wait(0) == MAX_WAIT  # a vault of nothing yet: one look every 5 minutes
    scrub.passes = {"a": Pass(total=4_000_000), "b": Pass(total=None)}
    assert scrub.wait(0) == 1 / 20  # more than a day's worth at 20/s: 20/s
    assert scrub.wait(8 * MiB) == 2.0  # an 8 MiB segment at 4 MiB/s
    scrub.passes = {"a": Pass(total=86_400)}
    assert scrub.wait(0) == 1.0  # a pass a day


# -- the lab: vault verify --repair of a postgres stream ------------------------------------


@dataclass
class PgStream:
    lab: Lab
    cfg: AgentConfig
    """Region b's configuration, with this stream in it (its DSN: the primary)."""
    options: PostgresOptions
    name: str
    store: S3Store
    send_keys: KeyProvider
    workdir: Path

    @property
    def vault(self) -> Vault:
        return Vault(self.store)

    @property
    def dsn(self) -> str:
        return self.lab.pg_dsn("a")


@pytest_asyncio.fixture(loop_scope="session")
async def pgs(
    lab: Lab, cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> AsyncIterator[PgStream]:
    await lab.up()
    slot = "dragent_s" + unique.replace("-", "_")[-40:]
    options = PostgresOptions(dsn=Secret(lab.pg_dsn("a"), "test"), slot=slot)
    stream = StreamConfig(name=unique, kind="postgres", postgres=options)
    cfg = cfg_b.model_copy(update={"streams": [stream]})
    store = await S3Store.open(cfg_a.peers[0].vault)
    send = build_key_provider(cfg_a.peers[0].keys)
    try:
        yield PgStream(lab, cfg, options, unique, store, send, tmp_path)
    finally:
        await send.aclose()
        await store.aclose()
        conn = await asyncpg.connect(lab.pg_dsn("a"))
        try:
            await conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = $1 AND NOT active",
                slot,
            )
        finally:
            await conn.close()


async def ship_wal(s: PgStream, rounds: int) -> list[SegmentRef]:
    """Write WAL on the primary while a shipper streams it into the vault (one segment
    per write, a WAL file switch midway); the stream's segments afterwards."""
    shipper = Shipper(
        ShipperSettings(s.name, "b", 1, 8 * MiB, 0.05),
        WalSource(s.options, "b"),
        s.vault,
        s.send_keys,
        s.workdir / "shipped.json",
        StreamProgress(s.name, "postgres", "source", "b"),
        Metrics(CollectorRegistry()).stream(s.name, "b"),
    )
    table = "t_" + s.name.replace("-", "_")
    conn = await asyncpg.connect(s.dsn)
    stop = asyncio.Event()
    await shipper.recover()

    async def loop() -> None:
        while not stop.is_set():
            if not await shipper.sync_once(stop):
                await asyncio.sleep(0.02)

    task = asyncio.create_task(loop())
    try:
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id int, v text)")
        for i in range(rounds):
            await conn.execute(
                f"INSERT INTO {table} SELECT g, repeat('x', 200) FROM generate_series(1, 300) g"
            )
            if i == rounds // 2:
                await conn.execute("SELECT pg_switch_wal()")
            await asyncio.sleep(0.15)
        end = L.parse_lsn(await conn.fetchval("SELECT pg_current_wal_flush_lsn()::text"))
        await eventually(lambda: shipper.end >= end, within=30, every=0.05)
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task
        await shipper.source.aclose()
        await conn.close()
    return [r async for r in s.vault.segments(s.name)]


async def flip(vault: Vault, r: SegmentRef) -> None:
    blob = bytearray(await vault.get_segment(r))
    blob[len(blob) * 3 // 4] ^= 0x04  # inside the sealed frames
    await vault.store.put(r.key, bytes(blob))


async def verify_json(
    cfg: AgentConfig, stream: str, capsys: pytest.CaptureFixture[str], repair: bool = False
) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = await vault_verify(cfg, stream, as_json=True, repair=repair)
    return code, json.loads(capsys.readouterr().out)


async def primary_wal(dsn: str, timeline: int, start: int, end: int) -> bytes:
    conn = await asyncpg.connect(dsn)
    try:
        name = L.wal_file_name(timeline, start)
        return bytes(
            await conn.fetchval(
                "SELECT pg_read_binary_file($1, $2, $3)",
                f"pg_wal/{name}",
                start % L.WAL_SEGMENT_SIZE,
                end - start,
            )
        )
    finally:
        await conn.close()


@pytest.mark.lab
async def test_verify_names_four_damaged_segments_and_repair_restores_the_primarys_wal(
    pgs: PgStream, capsys: pytest.CaptureFixture[str]
) -> None:
    refs = await ship_wal(pgs, 14)
    assert len(refs) >= 10, refs
    clean = {c.ref: c.opened for c in [c async for c in _check(pgs)]}
    assert all(o is not None for o in clean.values())
    flipped, deleted = [refs[2], refs[5], refs[6]], refs[8]
    for r in flipped:
        await flip(pgs.vault, r)
    await pgs.store.delete(deleted.key)
    damaged = sorted(r.key for r in [*flipped, deleted])

    def bounds(i: int) -> tuple[str, str]:
        before, after = clean[refs[i - 1]], clean[refs[i + 1]]
        assert before is not None and after is not None
        return before.header.end, after.header.start

    code, report = await verify_json(pgs.cfg, pgs.name, capsys)
    assert code == 1 and report["damaged"] == damaged
    assert report["missing"] == [deleted.key]
    covers = {p["segment"]: tuple(p["covers"]) for p in report["problems"]}
    assert covers[refs[2].key] == bounds(2)
    assert covers[refs[5].key] == covers[refs[6].key] == (bounds(5)[0], bounds(6)[1])
    assert covers[deleted.key] == bounds(8)

    conn = await asyncpg.connect(pgs.dsn)
    try:
        await conn.execute("CHECKPOINT")  # wal_keep_size and the slot still hold the WAL
    finally:
        await conn.close()
    code, report = await verify_json(pgs.cfg, pgs.name, capsys, repair=True)
    assert code == 0, report
    assert [r["repaired"] for r in report["repairs"]] == [True, True, True]
    assert sorted(k for r in report["repairs"] for k in r["segments"]) == damaged
    code, report = await verify_json(pgs.cfg, pgs.name, capsys)
    assert code == 0 and report["ok"] and report["segments"] == len(refs)

    # the repaired segments decode into exactly the primary's WAL, in a spool too
    spool = WalSpool(pgs.workdir / "spool")
    timelines: set[int] = set()  # the lab's primary may be past timeline 1 (earlier tests)
    async with contextlib.AsyncExitStack() as stack:
        keys = build_key_provider(pgs.cfg.keys)
        stack.push_async_callback(keys.aclose)
        walk = LogWalk(pgs.vault, keys, pgs.name)
        async with contextlib.aclosing(walk.read()) as segments:
            async for r, opened in segments:
                await spool.apply(r, opened.header, opened.records)
                if r.key not in damaged:
                    continue
                for tli, start, data in decode_records(opened.header, opened.records):
                    assert start not in (L.HISTORY, L.GAP)
                    assert data == await primary_wal(pgs.dsn, tli, start, start + len(data))
                    timelines.add(tli)
    (tli,) = timelines
    lo, hi = int(bounds(2)[0]), int(bounds(8)[1])
    files = (hi - 1) // L.WAL_SEGMENT_SIZE - lo // L.WAL_SEGMENT_SIZE + 1
    for start, end in R.split_range(lo, hi, files):
        from_spool = (spool.directory / L.wal_file_name(tli, start)).read_bytes()
        at = start % L.WAL_SEGMENT_SIZE
        assert from_spool[at : at + end - start] == await primary_wal(pgs.dsn, tli, start, end)


async def _check(s: PgStream) -> AsyncIterator[Any]:
    keys = build_key_provider(s.cfg.keys)
    try:
        async for c in LogWalk(s.vault, keys, s.name).check():
            yield c
    finally:
        await keys.aclose()


@pytest.mark.lab
async def test_a_range_whose_wal_left_the_primary_is_reported_unrepairable(
    pgs: PgStream, capsys: pytest.CaptureFixture[str]
) -> None:
    refs = await ship_wal(pgs, 6)
    victim = refs[len(refs) // 2]
    opened = {c.ref: c.opened async for c in _check(pgs)}
    before = opened[refs[len(refs) // 2 - 1]]
    assert before is not None
    start = int(before.header.end)
    # the lab's primary may be past timeline 1 (earlier tests): the WAL file's own name
    tli = max(t for t, _, _ in decode_records(before.header, before.records))
    await flip(pgs.vault, victim)
    name = L.wal_file_name(tli, start)
    conn = await asyncpg.connect(pgs.dsn)
    try:  # nothing holds it any more: the slot goes, WAL files pass wal_keep_size (64MB)
        await conn.execute("SELECT pg_drop_replication_slot($1)", pgs.options.slot)
        # inactive slots left by earlier tests on the shared primary would hold it too
        await conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE NOT active AND slot_type = 'physical'"
        )
        table = "t_" + pgs.name.replace("-", "_")
        for _ in range(12):
            await conn.execute(f"INSERT INTO {table} VALUES (0, 'x')")
            await conn.execute("SELECT pg_switch_wal()")
            await conn.execute("CHECKPOINT")
            present = {r["name"] for r in await conn.fetch("SELECT name FROM pg_ls_waldir()")}
            if name not in present:
                break
        if name in present:  # the suite's shared primary: something else holds it
            pytest.skip(f"{name} stays in pg_wal: another holder of the shared primary")
    finally:
        await conn.close()
    code, report = await verify_json(pgs.cfg, pgs.name, capsys, repair=True)
    assert code != 0 and not report["ok"]
    (outcome,) = report["repairs"]
    assert outcome["segments"] == [victim.key] and not outcome["repaired"]
    # gone from pg_wal, or (when PostgreSQL has recycled the name meanwhile) holding other
    # WAL: either way not this range, and said so
    gone = f"WAL file {name} is no longer in the source's pg_wal"
    assert gone in outcome["why"] or "does not hold this WAL" in outcome["why"], outcome
    assert report["damaged"] == [victim.key]  # still named, untouched
    capsys.readouterr()
    assert await vault_verify(pgs.cfg, pgs.name, as_json=False, repair=True) == 1
    text = capsys.readouterr().out
    assert f"repair {victim.key} (positions {start} to " in text
    assert f"NOT repaired: WAL file {name} is no longer in the source's pg_wal" in text


# -- the lab: the scrub job ------------------------------------------------------------------


@dataclass(frozen=True)
class FastRates:
    pass_period: float = 1.0
    segments_per_second: float = 1000.0
    bytes_per_second: int = 1 << 30


@pytest.mark.lab
async def test_scrub_finds_the_bad_segment_counts_and_resumes_from_its_checkpoint(
    cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    peer_b = cfg_a.peers[0]
    store = await S3Store.open(peer_b.vault)
    send, recv = build_key_provider(peer_b.keys), build_key_provider(cfg_b.keys)
    try:
        vault = Vault(store)
        synthetic = SyntheticOptions(rate=2000.0, record_size=64)
        shipper = lab_shipper(
            unique, "synthetic", SyntheticSource(synthetic), vault, send,
            tmp_path / "shipped.json", Metrics(CollectorRegistry()),
            segment_max_bytes=1 << 20, max_age=0.05,
        )  # fmt: skip
        stop = asyncio.Event()
        await shipper.recover()
        for _ in range(8):
            await shipper.sync_once(stop)
        refs = [r async for r in vault.segments(unique)]
        assert len(refs) >= 6
        await flip(vault, refs[3])
        assert unique in [s async for s in discover_streams(store)]

        stats, found = ScrubStats(), []

        async def record(kind: str, data: dict[str, Any]) -> None:
            found.append((kind, data))

        state = tmp_path / "scrub.json"

        def scrub() -> Scrub:
            return Scrub(
                vault, recv, state, FastRates(), streams=[unique], stats=stats,
                record=record, save_every=0.0,
            )  # fmt: skip

        first = scrub()
        await first.recover()
        for _ in range(2):
            await first.step()
        assert first.last_checked == refs[1]
        # a restart resumes after the last segment checked
        second = scrub()
        await second.recover()
        await second.step()
        assert second.last_checked == refs[2]
        while unique not in stats.completed:
            await second.step()
        assert stats.checked[unique] == len(refs)
        assert stats.bad[unique] == 1
        assert found == [
            (
                "scrub.bad-segment",
                {"stream": unique, "segment": refs[3].key, "error": found[0][1]["error"]},
            )
        ]
        assert "failed authentication" in found[0][1]["error"]
        assert 0 < second.wait(0) <= 1.0
        registry = CollectorRegistry()
        registry.register(stats)
        text = generate_latest(registry).decode()
        assert f'dragent_scrub_segments_checked_total{{stream="{unique}"}} {len(refs)}.0' in text
        assert f'dragent_scrub_bad_segments{{stream="{unique}"}} 1.0' in text
        assert f'dragent_scrub_last_pass_completed_timestamp{{stream="{unique}"}}' in text
        # the next pass starts over; the gauge keeps the last pass's count meanwhile
        await second.step()
        assert second.last_checked == refs[0] and stats.bad[unique] == 1
        saved = json.loads(state.read_text())
        assert saved["streams"][unique]["after"] == refs[0].key
        assert os.stat(state).st_mode & 0o777 == 0o600
    finally:
        await send.aclose()
        await recv.aclose()
        await store.aclose()


@pytest.mark.lab
def test_scrub_settings_are_validated_by_key(lab: Lab) -> None:
    data = tomllib.loads(Path(lab.config_path("b")).read_text())
    cfg = parse_config(dict(data))
    assert cfg.scrub.enabled and cfg.scrub.segments_per_second == 20.0
    assert cfg.scrub.pass_period == 86400.0 and int(cfg.scrub.bytes_per_second) == 4 * MiB
    data["scrub"] = {"segments_per_second": 0, "bytes_per_second": "0MiB", "rate": 3}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    text = "\n".join(err.value.problems)
    assert "scrub.segments_per_second" in text
    assert "scrub.bytes_per_second" in text
    assert "scrub.rate: unknown key" in text


@pytest.mark.lab
async def test_the_daemon_runs_the_scrub_of_its_own_vault(
    cfg_b: AgentConfig, tmp_path: Path
) -> None:
    from agent.streams import build_tasks

    cfg = cfg_b.model_copy(update={"data_dir": tmp_path})
    async with contextlib.AsyncExitStack() as stack:
        tasks = await build_tasks(cfg, Metrics(CollectorRegistry()), stack)
        (task,) = [t for t in tasks if t.name == "vault:scrub"]
        scrub = task.runner
        assert isinstance(scrub, Scrub) and scrub.state_path == tmp_path / "scrub.json"
        await scrub.recover()
        await scrub.step()  # the streams are found in the vault itself
        assert scrub.last_checked is not None or scrub.passes
    assert (tmp_path / "scrub.json").exists()  # saved when the generation closed
    off = cfg.model_copy(update={"scrub": cfg.scrub.model_copy(update={"enabled": False})})
    async with contextlib.AsyncExitStack() as stack:
        tasks = await build_tasks(off, Metrics(CollectorRegistry()), stack)
        assert not [t for t in tasks if t.name == "vault:scrub"]
