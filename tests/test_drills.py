"""Restore drills against region b's real vault (SeaweedFS) with real keys."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import pytest

from agent.compliance.controls import DRILL_RESTORE
from agent.config import AgentConfig, StreamConfig, SyntheticOptions
from agent.drills import restore_drill, run_restore_drill
from agent.drills.postgres import SCRATCH_ROOT
from agent.evidence import EvidenceLog
from agent.lab import Lab
from agent.policy_config import PolicyConfig
from replicators.keys import build_key_provider
from replicators.postgres.options import PostgresOptions
from replicators.s3 import S3Store
from replicators.segment import seal
from replicators.settings import Secret
from replicators.synthetic import make_record
from replicators.vault import SegmentRef, Vault
from tests.support import eventually
from tests.test_postgres_lab import (  # the postgres kind's lab rig, reused as is
    PgRig,
    current_lsn,
    execute,
    fetchval,
    free_port,
    insert_range,
    pg,  # noqa: F401 - a fixture
    running,
    table_of,
)

pytestmark = pytest.mark.lab

RECORD_SIZE = 64


def drill_config(cfg_b: AgentConfig, stream: str, tmp_path: Path) -> AgentConfig:
    """Region b's config with one synthetic stream, its own region name and data_dir."""
    data = tmp_path / "agent"
    data.mkdir(exist_ok=True)
    streams = [
        StreamConfig(
            name=stream, kind="synthetic", synthetic=SyntheticOptions(record_size=RECORD_SIZE)
        )
    ]
    return cfg_b.model_copy(update={"region": stream, "data_dir": data, "streams": streams})


async def publish(
    cfg: AgentConfig, stream: str, segments: int, per: int, t0: float | None = None
) -> list[float]:
    """Seal ``segments`` segments of ``per`` synthetic records each into cfg's vault.

    Record i is due at t0 + i/100. Returns each segment's last source time.
    """
    t0 = time.time() - 60 if t0 is None else t0
    store = await S3Store.open(cfg.vault)
    keys = build_key_provider(cfg.keys)
    lasts = []
    try:
        for n in range(segments):
            first = n * per
            times = [t0 + (first + i) / 100 for i in range(per)]
            records = [make_record(first + i, times[i], RECORD_SIZE, True) for i in range(per)]
            blob = seal(
                records, stream=stream, epoch=1, seq=n + 1, start=str(first),
                end=str(first + per), first_source_time=times[0], last_source_time=times[-1],
                data_key=await keys.data_key(), created_at=time.time(),
            )  # fmt: skip
            await Vault(store).put_segment(SegmentRef(1, n + 1, stream), blob)
            lasts.append(times[-1])
    finally:
        await keys.aclose()
        await store.aclose()
    return lasts


async def test_restore_drill_records_rto_and_equal_merkle_verdict(
    cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    cfg = drill_config(cfg_b, unique, tmp_path)
    await publish(cfg, unique, segments=5, per=40)
    log = await EvidenceLog.open(cfg)
    try:
        report, entry = await run_restore_drill(cfg, log)
        chain = await log.verify()
    finally:
        await log.aclose()
    assert report["ok"] and report["equal"]
    assert report["counts"] == {unique: 200}
    roots = {k.split("/")[1]: v for k, v in report["roots"].items()}
    assert set(roots) == {"vault", "restored", "source"} and len(set(roots.values())) == 1
    assert entry["type"] == DRILL_RESTORE and entry["data"]["equal"] is True
    assert entry["data"]["rto_seconds"] == report["rto_seconds"] > 0
    phases = entry["data"]["phases"]
    assert {"prepare", "restore", "verify", "teardown"} <= set(phases)
    assert report["rto_seconds"] == pytest.approx(
        phases["prepare"] + phases["restore"] + phases["verify"], abs=1e-5
    )
    assert entry["data"]["scratch_removed"] and not any((cfg.data_dir / "drills").iterdir())
    assert chain.ok, chain.problems
    assert [e["type"] for e in chain.entries] == ["evidence.genesis", DRILL_RESTORE]


async def test_restore_drill_to_a_past_time(
    cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    cfg = drill_config(cfg_b, unique, tmp_path)
    lasts = await publish(cfg, unique, segments=4, per=10)
    report = await restore_drill(cfg, at=lasts[1] + 0.001)
    assert report["ok"] and report["counts"] == {unique: 20}
    assert report["streams"][0]["end"] == "20"


async def test_restore_drill_fails_on_a_corrupted_segment(
    cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    cfg = drill_config(cfg_b, unique, tmp_path)
    await publish(cfg, unique, segments=3, per=10)
    store = await S3Store.open(cfg.vault)
    try:
        key = SegmentRef(1, 2, unique).key
        blob = bytearray(await store.get(key))
        blob[-40] ^= 0x01
        await store.delete(key)
        await store.put(key, bytes(blob))
    finally:
        await store.aclose()
    report = await restore_drill(cfg)
    assert not report["ok"]
    assert "integrity" in report["differences"][0]["what"]
    assert report["scratch_removed"]


def test_failover_drill_is_refused_unless_drillable(cfg_b: AgentConfig, tmp_path: Path) -> None:
    from agent.drills.failover import DrillRefused, check_allowed

    with pytest.raises(DrillRefused, match="not marked drillable"):
        check_allowed(cfg_b, tmp_path / "b" / "agent.toml", i_understand=False)
    drillable = cfg_b.model_copy(update={"policy": PolicyConfig(drillable=True)})
    with pytest.raises(DrillRefused, match="not a lab configuration"):
        check_allowed(drillable, tmp_path / "b" / "agent.toml", i_understand=False)


@pytest.mark.soak  # kills region a of the session's lab; about 20 s
async def test_failover_drill_measures_and_records(
    lab: Lab, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    from agent.compliance import controls as c
    from agent.drills.failover import check_allowed, failover_drill

    cfg = cfg_b.model_copy(update={"region": unique, "data_dir": tmp_path})
    root = check_allowed(cfg, lab.config_path("b"), i_understand=True)
    log = await EvidenceLog.open(cfg)
    try:
        data, entry = await failover_drill(cfg, root, log)
        entries = (await log.verify()).entries
    finally:
        await log.aclose()
    assert entry["type"] == "drill.failover" and data["ok"]
    assert 0 < data["rto_seconds"] < 60 and data["committed_rows"] > 0
    assert {"failure_seen", "promoted", "serving"} <= set(data["timeline"])
    now = entry["time"] + 1
    facts = c.Facts(now=now, policy=cfg.policy, streams=[], peers=["a"], entries=entries)
    result = next(r for r in c.evaluate(facts) if r.control == "failover-tested")
    assert result.status == "pass" and result.evidence[0]["seq"] == entry["seq"]


async def test_postgres_restore_drill_compares_with_the_standby(
    pg: PgRig,  # noqa: F811 - the fixture imported above
    cfg_b: AgentConfig,
    unique: str,
    tmp_path: Path,
) -> None:
    """A postgres stream: PITR into a scratch cluster, Merkle-compared with b's standby."""
    from replicators.postgres import standby
    from replicators.postgres.basebackup import take_backup

    table, primary = table_of(pg), pg.lab.pg_dsn("a")
    await execute(primary, f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    shipper, sink = pg.shipper(), pg.sink()
    port = free_port()
    standby_dir = pg.workdir / "standby"
    async with running(shipper, sink):
        await insert_range(primary, table, 0, 300)
        await take_backup(pg.options, pg.stream.name, pg.store, pg.send_keys)
        await insert_range(primary, table, 300, 500)
        pg.clusters.append(standby_dir)
        await standby.init_standby(
            pg.options, pg.stream.name, pg.store, pg.recv_keys,
            data_dir=standby_dir, port=port, spool=pg.spool,
        )  # fmt: skip
        end = await current_lsn(primary)
        await eventually(lambda: shipper.end >= end, within=30)
        standby_dsn = f"postgresql://dragent@127.0.0.1:{port}/app"

        async def replayed() -> bool:
            with contextlib.suppress(Exception):
                return await fetchval(standby_dsn, f"SELECT count(*) FROM {table}") == 500
            return False

        await eventually(replayed, within=60, every=0.2)
        options = PostgresOptions(
            dsn=Secret(standby_dsn, "test"),
            verify_tables=[f"public.{table}"],
        )
        stream = StreamConfig(name=pg.stream.name, kind="postgres", postgres=options)
        cfg = cfg_b.model_copy(update={"region": unique, "data_dir": tmp_path, "streams": [stream]})
        report = await restore_drill(cfg)
        result = report["streams"][0]
        assert report["ok"] and report["equal"], report["differences"]
        assert result["method"] == "postgres-pitr" and result["records"] == 500
        assert (
            result["tables"][f"public.{table}"]["restored"]
            == (result["tables"][f"public.{table}"]["source"])
        )
        assert {"restore", "verify", "teardown"} <= set(report["phases"])
        assert not any(SCRATCH_ROOT.glob(f"*-{os.getpid()}"))

        # a drill at a past time compares like with like: the state a passed drill recorded
        # by then, never the live standby (which has 200 more rows by now)
        recorded = [{"type": "drill.restore", "seq": 7, "data": report}]
        await asyncio.sleep(1.1)
        then = time.time()
        await asyncio.sleep(1.1)
        await insert_range(primary, table, 500, 700)
        end = await current_lsn(primary)
        await eventually(lambda: shipper.end >= end, within=30)
        past = await restore_drill(cfg, at=then, evidence=recorded)
        result = past["streams"][0]
        assert past["ok"] and result["records"] == 500, past["differences"]
        assert result["start"].endswith("(recorded by evidence entry 7)")
        before = await restore_drill(cfg, at=then - 3600, evidence=recorded)
        assert not before["ok"]
        assert "no state of" in before["streams"][0]["problem"], before["streams"][0]


async def test_objects_restore_drill_compares_a_scratch_bucket_with_the_mirror(
    lab: Lab, cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    from replicators.s3 import s3_client
    from tests.test_objects_rig import Rig, options, same, stream_config

    rig = Rig(unique, options(lab, f"{unique}/", scan_interval=0.5), cfg_a, cfg_b, tmp_path)
    src, dst = await rig.source_bucket(), await rig.mirror_bucket()
    try:
        for i in range(12):
            await src.write(f"k/{i:02d}", os.urandom(200 + i), "text/plain", {"n": str(i)})
        async with rig.running():
            await eventually(lambda: same(src, dst), within=60, every=0.5)
    finally:
        await src.aclose()
        await dst.aclose()
    stream = stream_config(unique, rig.opts)
    cfg = cfg_b.model_copy(update={"region": unique, "data_dir": tmp_path, "streams": [stream]})
    report = await restore_drill(cfg)
    result = report["streams"][0]
    assert report["ok"] and report["equal"], report["differences"]
    assert result["method"] == "objects-pitr" and result["records"] == 12
    assert result["roots"]["restored"] == result["roots"]["mirror"]
    async with s3_client(rig.opts.mirror) as s3:
        names = [b["Name"] for b in (await s3.list_buckets())["Buckets"]]
    assert not [n for n in names if n.startswith("dragent-drill-")]


async def test_artifacts_restore_drill_compares_a_scratch_directory_with_the_model_store(
    cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    from prometheus_client import CollectorRegistry

    from replicators.metrics import Metrics
    from tests.test_artifacts_pipeline import Rig, apply_all, publish, ship_once

    peer_b = cfg_a.peers[0]
    store = await S3Store.open(peer_b.vault)
    send, recv = build_key_provider(peer_b.keys), build_key_provider(cfg_b.keys)
    rig = Rig(unique, Vault(store), send, recv, tmp_path, Metrics(CollectorRegistry()))
    try:
        publish(rig.src, "tiny", "v1", 2 << 20)
        publish(rig.src, "tiny", "v2", 2 << 20)
        shipper = rig.shipper()
        await shipper.recover()
        await ship_once(shipper)
        await apply_all(rig)
    finally:
        await send.aclose()
        await recv.aclose()
        await store.aclose()
    stream = StreamConfig(name=unique, kind="artifacts", artifacts=rig.options(rig.dst))
    cfg = cfg_b.model_copy(update={"region": unique, "data_dir": tmp_path, "streams": [stream]})
    report = await restore_drill(cfg)
    result = report["streams"][0]
    assert report["ok"] and report["equal"], report["differences"]
    assert result["method"] == "artifacts-restore" and result["records"] == 2
    assert result["roots"]["restored"] == result["roots"]["model-store"]
    assert not any((rig.dst.parent / ".dragent-drills").rglob("*.safetensors"))
    # one changed byte in the model store: the drill names the version
    weights = rig.dst / "tiny" / "v2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    report = await restore_drill(cfg)
    assert not report["ok"] and "tiny/v2" in report["differences"][0]["what"]
