"""The lab in network namespaces: each member in its own, links cut by nftables.

One lab in ``netns`` mode serves the module (a fresh directory, the first free
slot); it is purged at the end, namespaces and bridge included. Reachability
is checked with TCP connections made from inside a member's namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from agent.lab import MEMBERS, REGIONS, Lab, LabError, processes
from agent.lab.cli import register
from agent.lab.netns import link_exists, namespaces
from tests.support import needs_netns, netns_lab

pytestmark = [pytest.mark.lab, needs_netns, pytest.mark.timeout(120)]

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def netlab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    async with netns_lab(tmp_path_factory.mktemp("netlab") / "lab") as lab:
        yield lab


@pytest.fixture(autouse=True)
def healed(netlab: Lab) -> None:
    netlab.heal()


async def connect_from(lab: Lab, member: str, to: str, service: str, within: float = 1.5) -> str:
    """A TCP connection from inside ``member``'s namespace to ``to``'s ``service``:
    "connected", "TimeoutError" (packets dropped) or the error's name."""
    argv = lab.network.place(member).wrap(
        [sys.executable, "-c", CONNECT, lab.address(to), str(lab.port(to, service)), str(within)]
    )
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode().strip()


def netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


async def test_each_member_runs_in_its_namespace_on_its_address(netlab: Lab) -> None:
    net = netlab.network
    assert net.mode == "netns"
    for where in MEMBERS:
        ns_inode = os.stat(f"/run/netns/{net.namespace(where)}").st_ino
        kinds = ("etcd",) if where == "witness" else ("postgres", "s3", "etcd")
        for kind in kinds:
            server = netlab.server(where, kind)
            assert server.pid is not None and netns_of(server.pid) == ns_inode, (where, kind)
            assert (
                server.host
                == net.address(where)
                == f"10.77.{netlab.slot}.{'123'[MEMBERS.index(where)]}"
            )
    assert netns_of(os.getpid()) != netns_of(netlab.server("a", "etcd").pid or 0)
    # every endpoint handed out uses the member's address, and the host reaches it
    assert f"@{netlab.address('a')}:" in netlab.pg_dsn("a")
    assert netlab.etcd_endpoints == [
        f"http://{netlab.address(m)}:{netlab.port(m, 'etcd_client')}" for m in MEMBERS
    ]
    config = netlab.agent_config("b")
    assert config["http"]["listen"] == f"{netlab.address('b')}:{netlab.port('b', 'agent')}"
    assert config["vault"]["endpoint"] == netlab.s3_endpoint("b")
    assert config["peers"][0]["agent_url"] == netlab.agent_url("a")
    conn = await asyncpg.connect(netlab.pg_dsn("b"))
    try:
        assert await conn.fetchval("SELECT host(inet_server_addr())") == netlab.address("b")
    finally:
        await conn.close()
    status = netlab.status()
    assert status["network"] == "netns" and status["partitions"] == []
    assert status["members"]["witness"] == {
        "address": netlab.address("witness"),
        "namespace": net.namespace("witness"),
    }


async def test_partition_drops_both_ways_and_heal_restores(netlab: Lab) -> None:
    assert await connect_from(netlab, "a", "b", "postgres") == "connected"
    netlab.partition("a", "b")
    assert netlab.partitions() == [("a", "b")]
    # dropped silently, both ways: a timeout, never a refusal
    assert await connect_from(netlab, "a", "b", "postgres") == "TimeoutError"
    assert await connect_from(netlab, "b", "a", "etcd_peer") == "TimeoutError"
    # every other link stays, and so does the host's
    assert await connect_from(netlab, "a", "witness", "etcd_client") == "connected"
    assert await connect_from(netlab, "b", "witness", "etcd_peer") == "connected"
    for region in REGIONS:
        assert await netlab.server(region, "postgres").probe()
    netlab.partition("a", "b")  # idempotent
    netlab.partition("witness", "b")
    assert netlab.partitions() == [("a", "b"), ("b", "witness")]
    netlab.heal("b", "a")
    assert netlab.partitions() == [("b", "witness")]
    assert await connect_from(netlab, "a", "b", "postgres") == "connected"
    netlab.partition("a", "witness")
    netlab.heal("witness")  # every link of the witness
    assert netlab.partitions() == []
    assert await connect_from(netlab, "witness", "a", "etcd_peer") == "connected"


async def test_a_one_way_cut_drops_one_direction_and_heal_restores(netlab: Lab) -> None:
    from agent.lab import partitions

    net = netlab.network
    netlab.partition_one_way("a", "b")
    assert partitions.cut_off(net.namespace("a"), partitions.OUT) == {net.address("b")}
    assert partitions.cut_off(net.namespace("b"), partitions.IN) == {net.address("a")}
    assert partitions.cut_off(net.namespace("b"), partitions.OUT) == set()
    assert await connect_from(netlab, "a", "b", "postgres") == "TimeoutError"
    assert await connect_from(netlab, "a", "witness", "etcd_client") == "connected"
    netlab.heal()
    assert partitions.cut_off(net.namespace("a"), partitions.OUT) == set()
    assert await connect_from(netlab, "a", "b", "postgres") == "connected"


async def test_up_again_keeps_servers_and_partitions(netlab: Lab) -> None:
    pids = {(w, k): netlab.server(w, k).pid for w in MEMBERS for k in ("etcd",)}
    pids[("a", "postgres")] = netlab.server("a", "postgres").pid
    netlab.partition("a", "b")
    await Lab(netlab.root).up()  # a later process: mode and slot from the state file
    assert {key: netlab.server(*key).pid for key in pids} == pids
    assert netlab.partitions() == [("a", "b")]
    assert await connect_from(netlab, "a", "b", "postgres") == "TimeoutError"
    with pytest.raises(LabError, match="runs in netns mode, not loopback"):
        Lab(netlab.root, network="loopback")


async def test_an_agent_starts_in_its_region_namespace(netlab: Lab) -> None:
    # the address exists only inside region a's namespace: binding it proves where it runs
    listen = (
        "import socket, sys, time; s = socket.socket();"
        " s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); time.sleep(600)"
    )
    address, port = netlab.address("a"), str(netlab.port("a", "agent"))
    argv = [sys.executable, "-c", listen, address, port, str(netlab.config_path("a"))]
    pid = await netlab.start_agent("a", argv)
    try:
        assert netns_of(pid) == os.stat(f"/run/netns/{netlab.network.namespace('a')}").st_ino
        assert netlab.status()["regions"]["a"]["agent"]["endpoint"] == netlab.agent_url("a")
        assert await connect_from(netlab, "b", "a", "agent") == "connected"
    finally:
        await netlab.fault("a", "agent", "kill")
    assert not processes.alive(pid)


def test_bad_links_are_refused_clearly(netlab: Lab) -> None:
    with pytest.raises(LabError, match="unknown member 'c'"):
        netlab.partition("a", "c")
    with pytest.raises(LabError, match="the same"):
        netlab.partition("b", "b")
    with pytest.raises(LabError, match="unknown member 'x'"):
        netlab.heal("x")


async def test_a_loopback_lab_says_how_to_get_partitions(tmp_path: Path) -> None:
    plain = Lab(tmp_path / "plain")
    try:
        await plain.up(services=())  # a slot and configs, no servers
        assert plain.partitions() == []
        with pytest.raises(LabError) as refused:
            plain.partition("a", "b")
        assert "127.0.0.1" in str(refused.value) and "--netns" in str(refused.value.hint)
    finally:
        await plain.down(purge=True)


def test_cli_cuts_lists_and_heals(netlab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="dragent")
    register(parser.add_subparsers(dest="command"))

    def run(*argv: str) -> int:
        args = parser.parse_args(["lab", *argv, "--dir", str(netlab.root)])
        return args.func(args)

    assert run("fault", "partition", "a", "witness") == 0
    assert "cut links: a-witness" in capsys.readouterr().out
    assert run("status") == 0
    out = capsys.readouterr().out
    assert f"a {netlab.address('a')} ({netlab.network.namespace('a')})" in out
    assert "cut links: a-witness" in out
    assert run("status", "--json") == 0
    assert json.loads(capsys.readouterr().out)["partitions"] == [["a", "witness"]]
    assert run("fault", "partition", "a", "nowhere") == 1
    assert "unknown member 'nowhere'" in capsys.readouterr().err
    assert run("fault", "partition", "a") == 2
    assert "partition X Y" in capsys.readouterr().err
    assert run("fault", "heal") == 0
    assert "cut links: none" in capsys.readouterr().out
    assert netlab.partitions() == []


async def test_up_clears_what_a_crashed_lab_left_on_its_slot(tmp_path: Path) -> None:
    crashed = Lab(tmp_path / "crashed", network="netns")
    await crashed.up(services={"etcd"})
    slot, net = crashed.slot, crashed.network
    left = [crashed.server(m, "etcd").pid for m in MEMBERS]
    crashed.partition("a", "b")
    shutil.rmtree(crashed.root)  # the lab is gone; its servers and namespaces are not
    again = Lab(tmp_path / "again", slot=slot, network="netns")
    try:
        await again.up(services={"etcd"})
        assert not any(processes.alive(p) for p in left if p)
        assert all(again.server(m, "etcd").is_running() for m in MEMBERS)
        assert again.partitions() == []
    finally:
        await again.down(purge=True)
    names = await namespaces()
    assert not {net.namespace(m) for m in MEMBERS} & names
    assert not any(link_exists(n) for n in (net.bridge, *(net.host_link(m) for m in MEMBERS)))
