"""The lab: real PostgreSQL, SeaweedFS and etcd for regions a and b and a witness.

One lab serves the whole module (about 4 s to bring up); the last test takes
it down, and the fixture purges it whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aetcd
import asyncpg
import pytest
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from agent.config import load_config
from agent.lab import DATA_BUCKET, REGIONS, VAULT_BUCKET, Lab, LabError, processes
from agent.lab import ports as lab_ports
from agent.lab.cli import register
from agent.lab.etcd import find_etcd
from agent.lab.postgres import find_bin_dir
from agent.lab.seaweed import find_weed, s3_client_config
from tests.support import eventually

pytestmark = pytest.mark.timeout(120)


def _missing_servers() -> list[str]:
    missing = []
    for name, find in (("postgresql", find_bin_dir), ("weed", find_weed), ("etcd", find_etcd)):
        try:
            find()
        except LabError:
            missing.append(name)
    return missing


needs_servers = pytest.mark.skipif(
    bool(_missing_servers()), reason=f"lab servers not installed: {_missing_servers()}"
)


@pytest.fixture(scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("lab") / "lab")
    try:
        await lab.up()
        yield lab
    finally:
        await lab.down(purge=True)


@contextlib.asynccontextmanager
async def s3_client(lab: Lab, region: str) -> AsyncIterator[Any]:
    creds = lab.s3_credentials
    client = get_session().create_client(
        "s3",
        endpoint_url=lab.s3_endpoint(region),
        region_name="us-east-1",
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key,
        config=s3_client_config(),
    )
    async with client as s3:
        yield s3


async def put_get(lab: Lab, region: str, key: str, body: bytes) -> bytes:
    async with s3_client(lab, region) as s3, asyncio.timeout(10):
        await s3.put_object(Bucket=VAULT_BUCKET, Key=key, Body=body)
        answer = await s3.get_object(Bucket=VAULT_BUCKET, Key=key)
        async with answer["Body"] as stream:
            return await stream.read()


def all_pids(lab: Lab) -> list[int]:
    pids = []
    for services in lab.status()["regions"].values():
        for s in services.values():
            if s["pid"]:
                pids += [s["pid"], *processes.descendants(s["pid"])]
    return pids


# -- without servers ---------------------------------------------------------


def test_slot_ports_are_distinct_and_slots_do_not_overlap() -> None:
    zero, one = lab_ports.slot_ports(0), lab_ports.slot_ports(1)
    assert zero["a.postgres"] == lab_ports.BASE_PORT
    assert len(set(zero.values())) == len(zero)
    assert not set(zero.values()) & set(one.values())
    assert max(lab_ports.slot_ports(lab_ports.MAX_SLOTS - 1).values()) < 32768
    assert lab_ports.group(zero, "witness") == {"etcd_client": 20040, "etcd_peer": 20041}
    with pytest.raises(LabError, match="out of range"):
        lab_ports.slot_ports(lab_ports.MAX_SLOTS)


def test_a_stale_pid_file_is_never_believed(tmp_path: Path) -> None:
    pid_file = tmp_path / "x.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    assert processes.read_pid(pid_file, marker=str(tmp_path / "not-in-my-cmdline")) is None
    assert processes.read_pid(pid_file, marker="python") == os.getpid()
    pid_file.write_text("garbage\n")
    assert processes.read_pid(pid_file, marker="python") is None
    assert processes.read_pid(tmp_path / "missing.pid", marker="python") is None


def test_two_labs_claim_different_slots(tmp_path: Path) -> None:
    roots = [tmp_path / "one", tmp_path / "two"]
    slots = []
    for root in roots:
        root.mkdir()

        def record(slot: int, root: Path = root) -> None:
            (root / "lab.json").write_text(f'{{"slot": {slot}}}')

        slots.append(lab_ports.claim_slot(root, None, record))
    try:
        assert slots[0] != slots[1]
        assert lab_ports.claim_owner(slots[0]) == roots[0]
        with pytest.raises(LabError, match="taken by the lab"):
            lab_ports.claim_slot(roots[1], slots[0], lambda slot: None)
    finally:
        for root, slot in zip(roots, slots, strict=True):
            lab_ports.release_slot(root, slot)
    assert lab_ports.claim_owner(slots[0]) is None


def test_status_of_a_missing_lab_says_so(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="there is no lab"):
        Lab(tmp_path).status()


# -- with the lab --------------------------------------------------------------


@pytest.mark.lab
@needs_servers
async def test_each_postgres_accepts_queries_and_replication(lab: Lab) -> None:
    for region in REGIONS:
        conn = await asyncpg.connect(lab.pg_dsn(region))
        try:
            row = await conn.fetchrow(
                "SELECT current_user AS who, current_setting('wal_level') AS wal,"
                " (SELECT rolreplication FROM pg_roles WHERE rolname = current_user) AS repl"
            )
            await conn.execute("CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY)")
            await conn.execute("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING")
            assert await conn.fetchval("SELECT count(*) FROM t") == 1
        finally:
            await conn.close()
        assert (row["who"], row["wal"], row["repl"]) == ("dragent", "replica", True)


@pytest.mark.lab
@needs_servers
async def test_each_s3_stores_objects_in_both_buckets(lab: Lab) -> None:
    for region in REGIONS:
        body = f"hello from {region}".encode()
        assert await put_get(lab, region, f"probe/{region}", body) == body
        async with s3_client(lab, region) as s3:
            names = {b["Name"] for b in (await s3.list_buckets())["Buckets"]}
        assert {VAULT_BUCKET, DATA_BUCKET} <= names


@pytest.mark.lab
@needs_servers
async def test_etcd_has_three_members_and_serves_reads_and_writes(lab: Lab) -> None:
    async with (
        aetcd.Client("127.0.0.1", lab.port("a", "etcd_client"), timeout=5) as a,
        aetcd.Client("127.0.0.1", lab.port("witness", "etcd_client"), timeout=5) as witness,
    ):
        names = sorted([m.name async for m in a.members()])
        await a.put(b"/lab/test", b"value")
        got = await witness.get(b"/lab/test")
    assert names == ["a", "b", "witness"]
    assert got is not None and got.value == b"value"


@pytest.mark.lab
@needs_servers
def test_agent_configs_load_and_point_at_the_lab(lab: Lab) -> None:
    for region, peer in (("a", "b"), ("b", "a")):
        cfg = load_config(lab.config_path(region))
        assert (cfg.region, cfg.role) == (region, "active" if region == "a" else "passive")
        assert cfg.vault.endpoint == lab.s3_endpoint(region)
        assert cfg.vault.bucket == VAULT_BUCKET and cfg.vault.addressing_style == "path"
        assert cfg.vault.access_key is not None
        assert cfg.vault.access_key.reveal() == lab.s3_credentials.access_key
        assert cfg.keys.key_file == lab.key_path(region)
        assert stat.S_IMODE(lab.key_path(region).stat().st_mode) == 0o600
        [p] = cfg.peers
        assert (p.name, p.agent_url, p.vault.endpoint) == (
            peer,
            lab.agent_url(peer),
            lab.s3_endpoint(peer),
        )
        assert p.keys.key_file == lab.key_path(peer)
        assert cfg.etcd.endpoints == lab.etcd_endpoints
        assert cfg.http.listen == f"127.0.0.1:{lab.port(region, 'agent')}"
        assert [(s.name, s.synthetic.rate) for s in cfg.streams] == [("synthetic", 200.0)]


@pytest.mark.lab
@needs_servers
async def test_status_is_found_again_by_a_later_process_and_up_is_idempotent(lab: Lab) -> None:
    later = Lab(lab.root)
    status = later.status()
    assert status["slot"] == lab.slot
    for where, services in status["regions"].items():
        for service, s in services.items():
            assert s["state"] == ("stopped" if service == "agent" else "running"), (where, service)
    before = all_pids(lab)
    started = time.monotonic()
    await later.up()
    assert time.monotonic() - started < 5
    assert all_pids(lab) == before


@pytest.mark.lab
@needs_servers
async def test_killed_s3_is_unreachable_until_started_and_keeps_its_objects(lab: Lab) -> None:
    assert await put_get(lab, "b", "before-kill", b"durable") == b"durable"
    await lab.fault("b", "s3", "kill")
    assert not lab.server("b", "s3").is_running()
    with pytest.raises((BotoCoreError, ClientError, OSError)):
        await put_get(lab, "b", "while-dead", b"x")
    assert await put_get(lab, "a", "other-region", b"fine") == b"fine"
    await lab.fault("b", "s3", "start")

    async def kept() -> bool:
        # right after a restart SeaweedFS may answer 500 (InternalError) for a moment
        # while its filer finds the volume again: a retried error, as the agents retry it
        try:
            async with s3_client(lab, "b") as s3:
                answer = await s3.get_object(Bucket=VAULT_BUCKET, Key="before-kill")
                async with answer["Body"] as stream:
                    return await stream.read() == b"durable"
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 500:
                return False
            raise

    await eventually(kept, within=20, every=0.5)
    assert await put_get(lab, "b", "after-start", b"back") == b"back"


@pytest.mark.lab
@needs_servers
async def test_paused_postgres_hangs_until_resumed(lab: Lab) -> None:
    await lab.fault("b", "postgres", "pause")
    try:
        assert lab.status()["regions"]["b"]["postgres"]["state"] == "paused"
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1):
                await asyncpg.connect(lab.pg_dsn("b"))
    finally:
        await lab.fault("b", "postgres", "resume")
    conn = await asyncpg.connect(lab.pg_dsn("b"))
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


@pytest.mark.lab
@needs_servers
async def test_etcd_keeps_a_quorum_without_the_witness(lab: Lab) -> None:
    await lab.fault("witness", "etcd", "kill")
    try:
        async with aetcd.Client("127.0.0.1", lab.port("b", "etcd_client"), timeout=5) as b:

            async def written() -> bool:
                # if the witness led, the other two elect a new leader first (about a second)
                try:
                    await b.put(b"/lab/quorum", b"two of three")
                except aetcd.exceptions.ClientError:
                    return False
                return True

            await eventually(written, within=15, every=0.5)
            got = await b.get(b"/lab/quorum")
        assert got is not None and got.value == b"two of three"
    finally:
        await lab.fault("witness", "etcd", "start")
    assert lab.status()["regions"]["witness"]["etcd"]["state"] == "running"


@pytest.mark.lab
@needs_servers
async def test_agent_faults_act_on_its_pid_file(lab: Lab) -> None:
    listen = (
        "import socket, sys, time; s = socket.socket();"
        " s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
        " s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(600)"
    )
    argv = [sys.executable, "-c", listen, str(lab.port("a", "agent")), str(lab.config_path("a"))]
    first = await lab.start_agent("a", argv)
    assert lab.status()["regions"]["a"]["agent"] == {
        "state": "running",
        "running": True,
        "pid": first,
        "port": lab.port("a", "agent"),
        "endpoint": lab.agent_url("a"),
    }
    await lab.fault("a", "agent", "kill")
    assert not processes.alive(first)
    await lab.fault("a", "agent", "start")
    second = lab.server("a", "agent").pid
    assert second is not None and second != first
    await lab.fault("a", "agent", "stop")
    assert lab.server("a", "agent").pid is None
    with pytest.raises(LabError, match="must name"):
        await lab.start_agent("b", [sys.executable, "-c", "pass"])


@pytest.mark.lab
@needs_servers
async def test_a_second_lab_comes_up_beside_the_first(lab: Lab, tmp_path: Path) -> None:
    second = Lab(tmp_path / "second")
    try:
        await second.up(services={"etcd"})  # the cheapest kind; the slot is what is tested
        assert second.slot != lab.slot
        assert not set(second.ports.values()) & set(lab.ports.values())
        for one in (second, lab):
            async with aetcd.Client("127.0.0.1", one.port("a", "etcd_client"), timeout=5) as c:
                await c.put(b"/lab/which", str(one.root).encode())
                got = await c.get(b"/lab/which")
            assert got is not None and got.value == str(one.root).encode()
        pids = all_pids(second)
        assert len(pids) == 3
    finally:
        await second.down(purge=True)
    assert not any(processes.alive(p) for p in pids)
    assert not (tmp_path / "second").exists()


@pytest.mark.lab
@needs_servers
def test_cli_shows_and_breaks_the_lab(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="dragent")
    register(parser.add_subparsers(dest="command"))

    def run(*argv: str) -> int:
        args = parser.parse_args(["lab", *argv, "--dir", str(lab.root)])
        return args.func(args)

    assert run("status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["slot"] == lab.slot
    assert run("fault", "witness", "etcd", "pause") == 0
    assert run("status") == 0
    assert re.search(r"witness\s+etcd\s+paused", capsys.readouterr().out)
    assert run("fault", "witness", "etcd", "resume") == 0
    assert run("fault", "witness", "s3", "kill") == 1
    assert "the witness runs only etcd" in capsys.readouterr().err


@pytest.mark.lab
@needs_servers
async def test_down_stops_every_process(lab: Lab) -> None:
    # Runs last in this module: the lab stays down (the fixture then purges it).
    pids = all_pids(lab)
    assert len(pids) >= 7
    await lab.down()
    assert not any(processes.alive(p) for p in pids)
    for services in lab.status()["regions"].values():
        assert {s["state"] for s in services.values()} == {"stopped"}
