"""The mirror's key tree kept by the sink, rebuilt by the passive side's job, served over
the agent's API, and compared with the source's tree by the active side's verify."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from agent.config import AgentConfig
from agent.http import StatusSource, build_app
from agent.lab import Lab
from agent.lab.stream_rig import running_pair
from agent.verifyjobs import VerifyJobs
from replicators.bucket import Bucket
from replicators.keys import build_key_provider
from replicators.objects import kind
from replicators.objects.kind import LazyTarget, MirrorTreeRebuild
from replicators.objects.source import ObjectsSource
from replicators.objects.trees import MIRROR_TREE, Row, TreeStore
from replicators.paths import StreamPaths
from replicators.s3 import S3Store
from replicators.settings import Secret
from tests.support import eventually
from tests.test_objects_rig import options, same, stream_config
from verifiers.objects import LocalTree, compare_trees, verify_buckets
from verifiers.remote_tree import RemoteTree

TOKEN = "tr33-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class _Status(StatusSource):
    def status(self) -> dict[str, Any]:
        return {"streams": []}

    def healthy(self) -> tuple[bool, str]:
        return True, ""

    def ready(self) -> tuple[bool, str]:
        return True, ""


@contextlib.asynccontextmanager
async def serving(cfg: Any) -> AsyncIterator[str]:
    """``cfg``'s agent API (``agent.http.build_app``) on a local port; yields its URL."""
    app = build_app(_Status(), CollectorRegistry(), TOKEN, VerifyJobs(lambda: cfg))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def _agent(cfg: AgentConfig, data_dir: Path, role: str, stream: Any, **extra: Any) -> AgentConfig:
    http = cfg.http.model_copy(update={"token": Secret(TOKEN, "env:TOKEN")})
    update = {"data_dir": data_dir, "role": role, "streams": [stream], "http": http}
    return cfg.model_copy(update=update | extra)


async def test_tree_routes_serve_the_local_file_and_compare_remotely(tmp_path: Path) -> None:
    """No lab servers needed: a tree written by hand, served, read back, compared."""
    stream = SimpleNamespace(name="trees", kind="objects", partitions=1)
    agent: Any = SimpleNamespace(data_dir=tmp_path / "b", streams=[stream], peers=[])
    path = StreamPaths(agent.data_dir, "trees").target / MIRROR_TREE
    tree = TreeStore(path)
    tree.rebuild((f"k/{i}", _row(i)) for i in range(300))
    other = TreeStore(tmp_path / "other.sqlite")
    other.rebuild((f"k/{i}", _row(i)) for i in range(300) if i != 7)
    try:
        async with serving(agent) as url, aiohttp.ClientSession() as http:
            base = f"{url}/api/v1/trees/trees"
            async with http.get(base) as resp:
                assert resp.status == 401
            async with http.get(f"{url}/api/v1/trees/nope", headers=AUTH) as resp:
                assert resp.status == 404
            async with http.get(base, headers=AUTH) as resp:
                assert resp.status == 200
                body = await resp.json()
            assert body["root"] == tree.root().hex() and body["keys"] == 300
            assert body["built_at"] == tree.built_at
            roots = {str(p): r.hex() for p, r in tree.partition_roots().items()}
            assert body["partition_roots"] == roots
            q = {"level": "8", "index": "0,1,2,255"}
            async with http.get(f"{base}/nodes", params=q, headers=AUTH) as resp:
                nodes = (await resp.json())["nodes"]
            want = {str(i): tree.node_at(8, i) for i in (0, 1, 2, 255)}
            assert nodes == {i: n.hex() if n else None for i, n in want.items()}
            b = tree.bucket("k/7")
            async with http.get(f"{base}/bucket/{b}", headers=AUTH) as resp:
                keys = (await resp.json())["keys"]
            assert keys == {k: v.hex() for k, v in tree.leaves(b).items()}
            bad = {"level": "3", "index": "8"}
            async with http.get(f"{base}/nodes", params=bad, headers=AUTH) as resp:
                assert resp.status == 400

            remote = RemoteTree(url, "trees", TOKEN)
            try:
                await remote.load()
                found = await compare_trees(LocalTree(other), remote)
            finally:
                await remote.aclose()
            assert found.keys == ["k/7"]
            assert found.nodes_compared < 200  # descended only where the trees differ
    finally:
        tree.close()
        other.close()


def _row(i: int) -> Row:
    return Row(100 + i, f"{i:032x}", f"e{i}")


@pytest.mark.lab
async def test_mirror_tree_follows_the_sink_and_a_verify_from_trees_repairs_drift(
    lab: Lab, cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    opts = options(lab, f"{unique}/", scan_interval=0.5)
    stream = stream_config(unique, opts)
    peer_b = cfg_a.peers[0]
    b = _agent(cfg_b, tmp_path / "b", "passive", stream)
    index_path = StreamPaths(tmp_path / "a", unique).to(peer_b.name) / "shipped.sqlite"
    mirror_path = StreamPaths(b.data_dir, unique).target / MIRROR_TREE
    src, dst = await Bucket.open(opts.source), await Bucket.open(opts.mirror)
    try:
        for i in range(25):
            await src.write(f"w/{i:02d}", os.urandom(300 + i), "text/plain", {"i": str(i)})
        await src.write("w/large", os.urandom(3 * 1024 * 1024 + 5), "application/x-model", {})
        async with _replicating(cfg_a, cfg_b, opts, unique, index_path.parent, mirror_path.parent):
            await eventually(lambda: same(src, dst), within=60, every=0.5)
            await src.delete("w/24")
            await src.write("w/03", b"second version", "text/plain", {})
            await eventually(lambda: same(src, dst), within=60, every=0.5)
            await eventually(lambda: _trees_agree(index_path, mirror_path), within=30, every=0.5)

        # after replication: the mirror's tree is the source's, partition for partition
        stree, mtree = TreeStore(index_path), TreeStore(mirror_path)
        assert mtree.partition_roots() == stree.partition_roots() and len(mtree) == 25
        assert mtree.built_at is None  # never rebuilt: not trusted yet
        stree.close()
        mtree.close()
        trees = (index_path, mirror_path)
        untrusted = await verify_buckets(unique, opts, index_path=index_path, trees=trees)
        assert "from_trees" not in untrusted and "not rebuilt" in untrusted["trees_skipped"]

        # the passive side's job: built at its first run, then only when due
        (job,) = kind.background(stream, b, "passive", StreamPaths(b.data_dir, unique).root)
        assert job.name == "mirror-tree" and isinstance(job.runner, MirrorTreeRebuild)
        await job.runner.sync_once(asyncio.Event())
        await job.runner.sync_once(asyncio.Event())
        assert job.runner.runs == 1 and job.runner.last["keys"] == 25

        # drift: an object changed in the mirror bucket behind the sink's back
        await dst.write("w/10", b"changed behind the sink", "text/plain", {})
        blind = await verify_buckets(unique, opts, index_path=index_path, trees=trees)
        assert blind["from_trees"] and blind["differences"] == []  # the trees cannot know
        drift = MirrorTreeRebuild(opts, mirror_path, interval=0.0)
        await drift.sync_once(asyncio.Event())

        # the active side's verify, the mirror's tree read over the passive agent's API
        async with serving(b) as url:
            peer = peer_b.model_copy(update={"agent_url": url})
            a = _agent(cfg_a, tmp_path / "a", "active", stream, peers=[peer])
            found = await kind.verify(stream, a)
            assert found["from_trees"] and found["trees"]["mirror"]["path"].startswith(url)
            assert found["differences"] == [{"what": "size or content differs", "where": "w/10"}]
            assert found["candidates"] == 1 and found["candidates_not_confirmed"] == 0
            fixed = await kind.verify(stream, a, repair=True)
            assert fixed["from_trees"] and fixed["repaired"] == 1 and fixed["ok"]
            assert await same(src, dst)
            # deep, or without the peer's URL: listings
            deep = await kind.verify(stream, a, deep=True)
            assert "from_trees" not in deep and deep["ok"]
        unreachable = await kind.verify(stream, a)
        assert "from_trees" not in unreachable and "mirror" in unreachable["trees_skipped"]

        # with the mirror's tree readable here, a repair also corrects that tree
        await dst.write("w/11", b"changed again", "text/plain", {})
        await MirrorTreeRebuild(opts, mirror_path, interval=0.0).sync_once(asyncio.Event())
        local = await kind.verify(stream, a, repair=True, mirror_tree=mirror_path)
        assert local["from_trees"] and local["repaired"] == 1
        clean = await kind.verify(stream, a, mirror_tree=mirror_path)
        assert clean["ok"] and clean["candidates"] == 0
        assert clean["roots"]["source"] == clean["roots"]["mirror"]
    finally:
        await src.aclose()
        await dst.aclose()


async def _trees_agree(source: Path, mirror: Path) -> bool:
    def roots() -> bool:
        if not source.exists() or not mirror.exists():
            return False
        s, m = TreeStore(source), TreeStore(mirror)
        try:
            return len(m) > 0 and s.partition_roots() == m.partition_roots()
        finally:
            s.close()
            m.close()

    return await asyncio.to_thread(roots)


@contextlib.asynccontextmanager
async def _replicating(
    cfg_a: AgentConfig, cfg_b: AgentConfig, opts: Any, name: str, src_dir: Path, dst_dir: Path
) -> AsyncIterator[None]:
    """Shipper (source state in ``src_dir``) and sink (a ``LazyTarget`` in ``dst_dir``, so
    the mirror's tree is kept) running in this process until the block ends."""
    async with contextlib.AsyncExitStack() as stack:
        peer = cfg_a.peers[0]
        store = await S3Store.open(peer.vault)
        stack.push_async_callback(store.aclose)
        send, recv = build_key_provider(peer.keys), build_key_provider(cfg_b.keys)
        stack.push_async_callback(send.aclose)
        stack.push_async_callback(recv.aclose)
        source = ObjectsSource(opts, await Bucket.open(opts.source), src_dir)
        stack.push_async_callback(source.aclose)
        target = LazyTarget(opts, dst_dir)
        stack.push_async_callback(target.aclose)
        pair = running_pair(
            name, "objects", source, target, store, (send, recv), src_dir, max_age=0.1, poll=0.1
        )
        async with pair:
            yield
