"""After a takeover the objects stream follows the roles (``source_region``): region b,
now active, ships from its bucket (the mirror, now serving) into region a's bucket,
applied by a's agent once a is passive. Real SeaweedFS in both regions."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from agent.config import AgentConfig, StreamConfig
from agent.lab import Lab
from replicators.bucket import Bucket, find_weed_binary
from replicators.objects import kind
from replicators.objects.options import ObjectsOptions
from tests.support import eventually
from tests.test_objects_rig import Rig, filer_address, options, snapshot, stream_config

pytestmark = pytest.mark.lab


@pytest.fixture
def opts(lab: Lab, unique: str) -> ObjectsOptions:
    filer = {"filer": filer_address(lab, "a"), "weed": find_weed_binary()}
    mirror_filer = {"filer": filer_address(lab, "b"), "weed": find_weed_binary()}
    return options(
        lab,
        f"{unique}/",
        source_region="a",
        events="filer",
        filer=filer,
        mirror_filer=mirror_filer,
        scan_interval=0.5,
    )


def test_each_region_ships_from_and_applies_into_its_own_bucket(
    opts: ObjectsOptions, cfg_a: AgentConfig, cfg_b: AgentConfig, tmp_path: Path
) -> None:
    stream: StreamConfig = stream_config("s", opts)
    a_bucket, b_bucket = opts.source, opts.mirror
    as_configured = kind.source(stream, cfg_a, cfg_a.peers[0], tmp_path).options  # type: ignore[attr-defined]
    assert (as_configured.source, as_configured.mirror) == (a_bucket, b_bucket)
    b_active = cfg_b.model_copy(update={"role": "active"})
    shipped = kind.source(stream, b_active, b_active.peers[0], tmp_path).options  # type: ignore[attr-defined]
    assert (shipped.source, shipped.mirror) == (b_bucket, a_bucket)
    assert shipped.filer is not None and shipped.filer.filer == opts.mirror_filer.filer  # type: ignore[union-attr]
    a_passive = cfg_a.model_copy(update={"role": "passive"})
    applied = kind.target(stream, a_passive, tmp_path).options  # type: ignore[attr-defined]
    assert applied.mirror == a_bucket
    assert kind.target(stream, cfg_b, tmp_path).options.mirror == b_bucket  # type: ignore[attr-defined]


def test_without_source_region_nothing_turns(lab: Lab, unique: str) -> None:
    plain = options(lab, f"{unique}/")
    assert plain.oriented("b") is plain
    with pytest.raises(ValueError, match="mirror_filer is used only with source_region"):
        options(lab, "x/", mirror_filer={"filer": filer_address(lab, "b")})


@pytest_asyncio.fixture(loop_scope="session")
async def reversed_rig(
    opts: ObjectsOptions, cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> AsyncIterator[Rig]:
    # b active: ships to a's vault with a's key; a's sink opens it with a's key
    yield Rig(unique, opts.oriented("b"), cfg_b, cfg_a, tmp_path)


async def test_after_a_takeover_b_serves_and_a_receives(
    reversed_rig: Rig, opts: ObjectsOptions
) -> None:
    b_bucket, a_bucket = await reversed_rig.source_bucket(), await reversed_rig.mirror_bucket()
    assert (b_bucket.cfg, a_bucket.cfg) == (opts.mirror, opts.source)
    try:
        await a_bucket.write("old/left-in-a", b"written before the failover", "", {})
        async with reversed_rig.running():
            for i in range(10):
                await b_bucket.write(f"new/{i}", os.urandom(500 + i), "text/plain", {"i": str(i)})
            await b_bucket.delete("new/3")
            await eventually(lambda: _holds_b(b_bucket, a_bucket), within=60, every=0.5)
    finally:
        await b_bucket.aclose()
        await a_bucket.aclose()


async def _holds_b(b_bucket: Bucket, a_bucket: Bucket) -> bool:
    """a's bucket holds b's objects under new/ (same bytes and metadata), not new/3."""
    b_snap = await snapshot(b_bucket)
    a_snap = {k: v for k, v in (await snapshot(a_bucket)).items() if k.startswith("new/")}
    return len(b_snap) == 9 and a_snap == b_snap
