"""A new stream kind needs its own module and one registry line, nothing else.

This file is such a kind, ``tally`` (a counter: record ``i`` is ``i`` as 8 bytes),
registered at run time and driven only through the registry and the core: a
shipper seals it into region b's real vault (SeaweedFS), a sink applies it to
its target, then its ``verify`` and its ``restore`` read the vault back with the
one log walk. The kind is the code between the two rules below.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from agent.config import AgentConfig
from agent.lab.stream_rig import lab_shipper, lab_sink
from replicators import registry
from replicators.keys import build_key_provider
from replicators.logread import LogWalk
from replicators.s3 import S3Store
from replicators.stream import Applied, Change
from replicators.vault import SegmentRef, Vault

pytestmark = pytest.mark.lab

# ---- the kind -----------------------------------------------------------------------------
KIND = "tally"
_N = struct.Struct(">Q")


class TallySource:
    KIND: ClassVar[str] = KIND

    def __init__(self, upto: int) -> None:
        self.upto, self.next = upto, 0

    async def resume(self, position: int) -> None:
        self.next = position

    async def next_batch(self, max_bytes: int, max_age: float, stop: asyncio.Event) -> list[Change]:
        batch = [Change(_N.pack(i), i, i + 1, 0.0) for i in range(self.next, self.upto)]
        self.next = self.upto
        return batch

    async def ack(self, position: int) -> None: ...

    def pending_since(self) -> float | None:
        return None

    async def aclose(self) -> None: ...


class TallyTarget:
    KIND: ClassVar[str] = KIND

    def __init__(self, path: Path) -> None:
        self.path, self.last = path, None

    async def state(self) -> Applied | None:
        return self.last

    async def apply(self, ref: SegmentRef, header: Any, records: list[bytes]) -> None:
        with self.path.open("ab") as f:
            f.write(b"".join(records))
        self.last = Applied(ref, int(header.end), header.last_source_time)

    async def aclose(self) -> None: ...


def source(stream: Any, agent: Any, peer: Any, state_dir: Path) -> TallySource:
    return TallySource(stream.upto)


def target(stream: Any, agent: Any, state_dir: Path) -> TallyTarget:
    return TallyTarget(state_dir / "tally")


async def _read(stream: Any, agent: Any) -> bytes:
    store = await S3Store.open(agent.vault)
    keys = build_key_provider(agent.keys)
    try:
        walk = LogWalk(Vault(store), keys, stream.name)
        return b"".join([b"".join(o.records) async for _, o in walk.read()])
    finally:
        await keys.aclose()
        await store.aclose()


async def verify(stream: Any, agent: Any, *, deep: bool = False, repair: bool = False) -> dict:
    vault = await _read(stream, agent)
    copy = (agent.data_dir / "tally").read_bytes()
    return {"kind": KIND, "stream": stream.name, "ok": vault == copy, "counts": len(vault) // 8}


async def restore(stream: Any, agent: Any, into: Path, *, at: float | None = None) -> dict:
    data = await _read(stream, agent)
    await asyncio.to_thread(into.write_bytes, data)
    return {"records": len(data) // 8}


# ---- the test -----------------------------------------------------------------------------
@dataclass
class Stream:
    name: str
    kind: str = KIND
    upto: int = 1000


@dataclass
class Region:
    vault: Any
    keys: Any
    data_dir: Path
    peers: list[Any] = field(default_factory=list)


async def test_a_kind_of_its_own_ships_applies_verifies_and_restores(
    cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    registry.register(KIND, __name__)
    stream = Stream(unique)
    b = Region(cfg_b.vault, cfg_b.keys, tmp_path / "b")
    b.data_dir.mkdir()
    peer = cfg_a.peers[0]
    store = await S3Store.open(peer.vault)
    send, recv = build_key_provider(peer.keys), build_key_provider(cfg_b.keys)
    try:
        src = registry.build_source(stream, Region(None, None, tmp_path), peer, tmp_path / "a")
        shipper = lab_shipper(unique, KIND, src, Vault(store), send, tmp_path / "shipped.json")
        await shipper.recover()
        assert await shipper.sync_once(asyncio.Event())
        tgt = registry.build_target(stream, b, b.data_dir)
        sink = lab_sink(unique, KIND, tgt, Vault(store), recv)
        await sink.recover()
        await sink.sync_once(asyncio.Event())
    finally:
        await send.aclose()
        await recv.aclose()
        await store.aclose()
    kind = registry.module(KIND)
    report = await kind.verify(stream, b, deep=True)
    assert report["ok"] and report["counts"] == 1000
    restored = await kind.restore(stream, b, tmp_path / "restored")
    assert restored == {"records": 1000}
    assert (tmp_path / "restored").read_bytes() == b"".join(_N.pack(i) for i in range(1000))
