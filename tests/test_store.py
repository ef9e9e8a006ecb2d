"""The ObjectStore contract, run against every store kind (here: S3 on a real SeaweedFS)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from agent.config import AgentConfig
from replicators.errors import AccessDenied, AlreadyExists, NotFound, Unavailable
from replicators.s3 import S3Store
from replicators.store import ObjectStore

pytestmark = pytest.mark.lab


@pytest_asyncio.fixture(loop_scope="session")
async def store(cfg_a: AgentConfig, unique: str) -> AsyncIterator[ObjectStore]:
    s = await S3Store.open(cfg_a.vault.model_copy(update={"prefix": f"contract/{unique}/"}))
    try:
        yield s
    finally:
        await s.aclose()


async def test_put_get_stat_round_trip_with_metadata(store: ObjectStore) -> None:
    await store.put("a/1", b"hello", metadata={"content-hash": "abc"})
    assert await store.get("a/1") == b"hello"
    info = await store.stat("a/1")
    assert info.size == 5
    assert info.metadata.get("content-hash") == "abc"


async def test_put_if_absent_publishes_once(store: ObjectStore) -> None:
    await store.put("once", b"first", if_absent=True)
    with pytest.raises(AlreadyExists):
        await store.put("once", b"second", if_absent=True)
    assert await store.get("once") == b"first"
    await store.put("once", b"third")  # a plain put overwrites
    assert await store.get("once") == b"third"


async def test_missing_keys(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        await store.get("nope")
    with pytest.raises(NotFound):
        await store.stat("nope")
    await store.delete("nope")  # idempotent


async def test_list_is_ordered_paged_and_starts_after(store: ObjectStore) -> None:
    keys = [f"l/{i:05d}" for i in range(1203)]  # more than one page of 1000
    for k in keys[:3] + keys[-3:]:
        await store.put(k, b"x")
    for k in keys[3:-3]:
        await store.put(k, b"")
    listed = [i.key async for i in store.list("l/")]
    assert listed == keys
    after = [i.key async for i in store.list("l/", start_after="l/01199")]
    assert after == keys[1200:]


async def test_large_object_goes_multipart_and_is_atomic(cfg_a: AgentConfig, unique: str) -> None:
    cfg = cfg_a.vault.model_copy(
        update={"prefix": f"contract/{unique}/", "multipart_threshold": 6 << 20}
    )
    store = await S3Store.open(cfg)
    try:
        body = bytes(range(256)) * (13 << 20 >> 8)  # 13 MiB: three parts of 5 MiB or less
        await store.put("big", body, if_absent=True)
        assert await store.get("big") == body
        with pytest.raises(AlreadyExists):
            await store.put("big", body, if_absent=True)
    finally:
        await store.aclose()


async def test_delete_then_missing(store: ObjectStore) -> None:
    await store.put("d", b"1")
    await store.delete("d")
    with pytest.raises(NotFound):
        await store.get("d")


async def test_wrong_credentials_are_access_denied(cfg_a: AgentConfig) -> None:
    from agent.config import Secret

    bad = cfg_a.vault.model_copy(
        update={"access_key": Secret("wrong", "test"), "secret_key": Secret("wrong", "test")}
    )
    store = await S3Store.open(bad)
    try:
        with pytest.raises(AccessDenied):
            await store.put("x", b"1")
    finally:
        await store.aclose()


async def test_unreachable_endpoint_is_unavailable(cfg_a: AgentConfig) -> None:
    dead = cfg_a.vault.model_copy(
        update={"endpoint": "http://127.0.0.1:9", "max_attempts": 1, "connect_timeout": 0.5}
    )
    store = await S3Store.open(dead)
    try:
        with pytest.raises(Unavailable):
            await store.get("x")
    finally:
        await store.aclose()
