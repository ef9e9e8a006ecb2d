"""Cost as a figure: the pricing formulas on hand-worked numbers, the cost counters against
what a counting proxy in front of the lab's SeaweedFS saw, and ``dragent report cost`` on
the cost log of a short real run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from agent.config import AgentConfig, StreamConfig, SyntheticOptions
from agent.costlog import load_prices, read_samples
from agent.lab import Lab
from agent.lab.stream_rig import lab_shipper
from agent.reports.cost import (
    GB,
    PriceError,
    Usage,
    cost_report,
    crr_cost,
    dragent_cost,
    increase,
    month_estimate,
    parse_prices,
    pgbackrest_cost,
    select,
    time_average,
    usage,
)
from replicators.errors import NotFound
from replicators.keys import build_key_provider
from replicators.store import ObjectInfo
from replicators.store_metrics import (
    InstrumentedStore,
    StoreMetrics,
    build_store,
    put_requests,
    stream_of,
)
from replicators.synthetic import SyntheticSource
from replicators.vault import Vault
from tests.support import eventually
from tests.test_agent import Pair, _past

ROOT = Path(__file__).resolve().parent.parent
PRICES = load_prices()


def dragent(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``dragent ARGS`` in a child process (its stdout and stderr kept)."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, check=check
    )


# -- price table ---------------------------------------------------------------------------


def test_the_default_price_table_holds_the_public_s3_prices() -> None:
    assert (PRICES.put_per_1000, PRICES.get_per_1000, PRICES.delete_per_1000) == (
        0.005,
        0.0004,
        0.0,
    )
    assert (PRICES.storage_gb_month, PRICES.transfer_gb, PRICES.rtc_gb) == (0.023, 0.02, 0.015)
    assert (PRICES.region, PRICES.read) == ("us-east-1", "2026-12")
    assert PRICES.per_request("LIST") == PRICES.per_request("PUT") == 0.005 / 1000
    assert PRICES.per_request("HEAD") == PRICES.per_request("GET") == 0.0004 / 1000


def test_a_bad_price_table_is_refused_naming_file_key_and_expectation(tmp_path: Path) -> None:
    good = (ROOT / "agent" / "reports" / "prices" / "aws-s3-2026.toml").read_text()
    bad = tmp_path / "mine.toml"
    bad.write_text(good.replace("gb_month = 0.023", 'gb_month = "cheap"'))
    with pytest.raises(PriceError, match=r"mine\.toml: \[storage\] gb_month: expected a number"):
        load_prices(bad)
    bad.write_text(good.replace("[transfer]", "[transfers]"))
    with pytest.raises(PriceError, match=r"mine\.toml: \[transfer\]: expected a table"):
        load_prices(bad)
    bad.write_text("requests = [")
    with pytest.raises(PriceError, match=r"mine\.toml: expected TOML"):
        load_prices(bad)
    with pytest.raises(PriceError, match=r"missing\.toml: cannot be read"):
        load_prices(tmp_path / "missing.toml")
    with pytest.raises(PriceError, match=r"x: \[requests\] delete: expected a number of dollars"):
        parse_prices({"requests": {"put_copy_post_list": 1, "get_and_other": 1, "delete": -1}}, "x")
    # the CLI says it and exits 2
    out = dragent(
        "report", "cost", "--log", str(bad), "--from", "0", "--prices", str(bad), check=False
    )
    assert out.returncode == 2 and "mine.toml" in out.stderr


# -- the arithmetic --------------------------------------------------------------------------


def series(stream: str = "pg", dest: str = "b", kind: str = "postgres", **v: Any) -> dict:
    req = {c: v.pop(c, 0) for c in ("PUT", "GET", "HEAD", "LIST", "DELETE")}
    return {"stream": stream, "destination": dest, "kind": kind, "requests": req, **v}


def sample(t: float, *rows: dict, boot: str = "x") -> dict[str, Any]:
    return {"t": t, "boot": boot, "series": list(rows)}


HOUR = [
    sample(1000, series()),
    sample(
        4600,
        series(
            PUT=3600,
            LIST=10,
            cross_region_bytes=GB,
            stored_bytes=GB,
            written_objects=3600,
            written_bytes=GB,
            raw_bytes=2 * GB,
        ),
    ),
]


def test_increase_restarts_with_a_new_process_or_a_fall() -> None:
    assert increase([("a", 0), ("a", 5), ("a", 9)]) == 9
    assert increase([("a", 0), ("a", 5), ("b", 2), ("b", 3)]) == 5 + 2 + 1
    assert increase([("a", 4), ("a", 7), ("a", 1)]) == 3 + 1
    assert increase([("a", 4)]) == 0


def test_time_average_is_the_trapezoid() -> None:
    assert time_average([(0, 0), (10, 10)]) == 5
    assert time_average([(0, 0), (10, 10), (30, 10)]) == (50 + 200) / 30
    assert time_average([(5, 7)]) == 7


def test_select_takes_the_samples_nearest_from_and_to() -> None:
    samples = [sample(t) for t in (0, 100, 200, 300)]
    assert [s["t"] for s in select(samples, 90, 240)] == [100, 200]
    assert [s["t"] for s in select(samples, -50, 1000)] == [0, 100, 200, 300]
    assert select([], 0, 1) == []


def test_one_hour_of_one_put_a_second_priced_by_hand() -> None:
    """3,600 PUTs and 10 LISTs in an hour, 1 GiB across regions, stored growing 0 → 1 GiB,
    2 GiB of WAL. scale = 730 h / 1 h = 730."""
    (u,) = usage(HOUR)
    assert u.seconds == 3600 and u.requests["PUT"] == 3600 and u.stored_bytes_avg == GB / 2
    mine = dragent_cost(u, PRICES)
    assert mine.requests == pytest.approx(730 * 3610 * 0.005 / 1000)  # 13.1765
    assert mine.transfer == pytest.approx(730 * 0.02)  # 14.6
    assert mine.storage == pytest.approx(0.5 * 0.023)  # 0.0115, not scaled
    assert mine.monthly == pytest.approx(27.788)
    crr = crr_cost(u, PRICES, rtc=False)
    assert crr.monthly == pytest.approx(730 * (3600 * 0.005 / 1000 + 0.02) + 0.0115)  # 27.7515
    rtc = crr_cost(u, PRICES, rtc=True)
    assert rtc.monthly == pytest.approx(27.7515 + 730 * 0.015)  # 38.7015
    # pgBackRest: 2 GiB / 16 MiB = 128 WAL files > 3600 s / 60 s = 60 forced switches
    pg = pgbackrest_cost(u, PRICES, archive_timeout=60)
    assert pg.monthly == pytest.approx(730 * (128 * 0.005 / 1000 + 0.02) + 0.0115)  # 15.0787
    # an idle database: the archive_timeout floor (3600 / 10 = 360 files) wins
    idle = Usage("pg", "b", "postgres", seconds=3600, raw_bytes=16 << 20)
    assert pgbackrest_cost(idle, PRICES, archive_timeout=10).requests == pytest.approx(
        730 * 360 * 0.005 / 1000
    )


def test_the_report_carries_every_figure_and_pgbackrest_only_for_postgres() -> None:
    objects = series("obj", kind="objects", PUT=100, GET=50, HEAD=5, DELETE=7)
    samples = [HOUR[0] | {"series": [*HOUR[0]["series"], series("obj", kind="objects")]}]
    samples.append(HOUR[1] | {"series": [*HOUR[1]["series"], objects]})
    r = cost_report(samples, PRICES, 0, 10_000)
    assert (r["from"], r["to"], r["seconds"], r["samples"]) == (1000, 4600, 3600, 2)
    rows = {x["stream"]: x for x in r["streams"]}
    assert rows["pg"]["cost"]["monthly"] == pytest.approx(27.788)
    assert rows["pg"]["pgbackrest"]["wal_files"] == 128
    assert rows["obj"]["pgbackrest"] is None
    assert rows["obj"]["requests_per_hour"] == {
        "PUT": 100,
        "GET": 50,
        "HEAD": 5,
        "LIST": 0,
        "DELETE": 7,
    }
    obj_requests = 730 * (100 * 0.005 + 55 * 0.0004) / 1000  # DELETE is free
    assert rows["obj"]["cost"]["monthly"] == pytest.approx(obj_requests, abs=1e-6)
    assert r["total_monthly"]["dragent"] == pytest.approx(27.788 + obj_requests, abs=1e-5)
    assert r["total_monthly"]["pgbackrest"] == pytest.approx(15.0787, abs=1e-4)
    assert any("pgBackRest" in f for f in r["formulas"])


def test_month_estimate_scales_what_the_month_has_seen() -> None:
    est = month_estimate(HOUR, PRICES)
    assert est["monthly"] == pytest.approx(27.788, abs=1e-4)
    assert est["streams"] == {"pg->b": pytest.approx(27.788, abs=1e-4)}


# -- the counters, on a store in memory -------------------------------------------------------


class MemoryStore:
    KIND: ClassVar[str] = "memory"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.objects[key] = data

    async def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        if key not in self.objects:
            raise NotFound("no such key", key=key)
        return self.objects[key]

    async def stat(self, key: str) -> ObjectInfo:
        return ObjectInfo(key, len(await self.get(key)))

    async def list(
        self, prefix: str, *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        for key in sorted(self.objects):
            if key.startswith(prefix) and (start_after is None or key > start_after):
                yield ObjectInfo(key, len(self.objects[key]))

    async def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    async def aclose(self) -> None:
        pass


def values(sm: StoreMetrics, metric: str) -> dict[tuple[str, ...], float]:
    counter = getattr(sm, metric)
    out = {}
    for family in counter.collect():
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[tuple(s.labels.values())] = s.value
    return out


def test_stream_of_a_key_is_bounded_by_the_configuration() -> None:
    assert stream_of("streams/pg/0000000001/00000000000000000001.seg") == "pg"
    assert stream_of("artifacts/models/packs/ab12cd34/000000000001.pack") == "models"
    assert stream_of("backups/pg/123/part-00000001.seg") == "pg"
    assert stream_of("probes/create-only-abc") == "-"
    assert stream_of("streams/") == "-"
    assert stream_of("streams/other/", streams={"pg"}) == "-"


def test_a_multipart_put_is_its_create_parts_and_complete() -> None:
    from replicators.settings import S3Config

    cfg = S3Config(bucket="b", multipart_threshold=16 << 20, multipart_chunk=8 << 20)
    assert put_requests(16 << 20, cfg) == 1
    assert put_requests((16 << 20) + 1, cfg) == 2 + 3
    assert put_requests(100, None) == 1


async def test_counters_per_class_transfer_and_stored_bytes() -> None:
    sm = StoreMetrics(CollectorRegistry())
    store = InstrumentedStore(MemoryStore(), sm, "vault-b", cross_region=True, streams={"s"})
    for i in range(2500):
        await store.put(f"streams/s/0000000001/{i:020d}.seg", b"x" * 10, if_absent=True)
    assert len([i async for i in store.list("streams/s/")]) == 2500  # 3 pages of 1,000
    assert len([i async for i in store.list("streams/s/", start_after="zzz")]) == 0  # 1 page
    await store.get("streams/s/0000000001/00000000000000000000.seg")
    with pytest.raises(NotFound):
        await store.get("streams/s/none")
    await store.stat("streams/s/0000000001/00000000000000000001.seg")
    await store.delete("streams/s/0000000001/00000000000000000001.seg")  # size known: -10
    await store.delete("streams/s/0000000001/00000000000000000001.seg")  # gone: not again
    store._sizes.clear()  # a key this store has not seen: its size is unknown
    await store.delete("streams/s/0000000001/00000000000000000002.seg")  # not guessed
    await store.put("probes/p", b"1")
    await store.put("streams/unconfigured/x", b"12")
    billed = values(sm, "billed")
    assert billed[("s", "b", "PUT")] == 2500
    assert billed[("s", "b", "LIST")] == 3 + 1
    assert billed[("s", "b", "GET")] == 2
    assert billed[("s", "b", "HEAD")] == 1
    assert billed[("s", "b", "DELETE")] == 3
    assert billed[("-", "b", "PUT")] == 2
    assert values(sm, "cross_region")[("s", "b")] == 2500 * 10 + 10
    assert values(sm, "stored")[("s", "b")] == 2500 * 10 - 10
    assert values(sm, "written_objects")[("s", "b")] == 2500


class VersionedStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.purged: list[str] = []

    async def purge(self, key: str) -> None:
        self.purged.append(key)
        self.objects.pop(key, None)


async def test_a_purge_goes_to_the_inner_store_and_is_counted_like_a_delete() -> None:
    sm = StoreMetrics(CollectorRegistry())
    inner = VersionedStore()
    store = InstrumentedStore(inner, sm, "vault-b")
    await store.put("backups/pg/1/part-00000001.seg", b"x" * 100)
    await store.purge("backups/pg/1/part-00000001.seg")  # the collector's delete
    assert inner.purged == ["backups/pg/1/part-00000001.seg"]
    assert values(sm, "stored")[("pg", "b")] == 0
    billed = values(sm, "billed")
    assert (billed[("pg", "b", "LIST")], billed[("pg", "b", "DELETE")]) == (1, 1)
    plain = InstrumentedStore(MemoryStore(), sm, "vault-c")  # no purge: a plain delete
    await plain.put("backups/pg/1/x", b"yy")
    await plain.purge("backups/pg/1/x")
    assert values(sm, "stored")[("pg", "c")] == 0 and ("pg", "c", "LIST") not in values(
        sm, "billed"
    )


# -- lab: the counters against what SeaweedFS was sent ---------------------------------------


def s3_class(method: str, path: str, query: Mapping[str, str]) -> str:
    """The billing class of a request, as the proxy sees it (path-style addressing)."""
    if method == "GET" and ("list-type" in query or len([p for p in path.split("/") if p]) <= 1):
        return "LIST"
    if method == "POST":  # multipart create and complete
        return "PUT"
    return method


class CountingProxy:
    """Plain HTTP in front of ``upstream``: counts requests by billing class and the bytes of
    PUT bodies and GET (object) answers."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.counts: Counter[str] = Counter()
        self.put_bytes = 0
        self.get_bytes = 0
        self.url = ""

    async def __aenter__(self) -> CountingProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        cls = s3_class(request.method, request.path, request.query)
        self.counts[cls] += 1
        if cls == "PUT" and request.method == "PUT":
            self.put_bytes += len(body)
        skip = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "trailer"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body or None,
            skip_auto_headers=("Content-Type", "User-Agent", "Accept", "Accept-Encoding"),
            allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            if cls == "GET" and upstream.status == 200:
                self.get_bytes += len(payload)
            response = web.Response(body=payload, status=upstream.status, reason=upstream.reason)
            for k, v in upstream.headers.items():
                if k.lower() not in skip and k.lower() != "content-length":
                    response.headers[k] = v
            if request.method == "HEAD":
                response.headers["Content-Length"] = upstream.headers.get("Content-Length", "0")
            return response


@pytest.mark.lab
async def test_cost_counters_equal_what_the_store_was_sent(
    cfg_a: AgentConfig, cfg_b: AgentConfig, unique: str, tmp_path: Path
) -> None:
    peer = cfg_a.peers[0]
    async with CountingProxy(peer.vault.endpoint or "") as proxy:
        vault_cfg = peer.vault.model_copy(
            update={
                "endpoint": proxy.url,
                "addressing_style": "path",
                "multipart_threshold": 6 << 20,
                "multipart_chunk": 5 << 20,
                "max_attempts": 1,  # a retry would be a request the store does not see
            }
        )
        sm = StoreMetrics(CollectorRegistry())
        store = await build_store(vault_cfg, sm, "vault-b", cross_region=True, streams=[unique])
        keys = build_key_provider(peer.keys)
        try:
            vault = Vault(store)
            source = SyntheticSource(
                StreamConfig(
                    name=unique,
                    kind="synthetic",
                    synthetic=SyntheticOptions(rate=2000, record_size=64),
                ).synthetic
            )
            shipper = lab_shipper(
                unique, "synthetic", source, vault, keys, tmp_path / "shipped.json",
                segment_max_bytes=1 << 20, max_age=0.05,
            )  # fmt: skip
            await shipper.recover()
            stop = asyncio.Event()

            async def ship() -> None:
                while await shipper.sync_once(stop):
                    pass

            task = asyncio.create_task(ship())
            await asyncio.sleep(1.0)
            stop.set()
            async with asyncio.timeout(10):
                await task
            refs = [r async for r in vault.segments(unique)]
            assert len(refs) > 5
            for ref in refs[:3]:
                await vault.get_segment(ref)
            first = await store.stat(refs[0].key)
            await store.delete(refs[0].key)  # size known (listed): stored bytes go down
            big = f"backups/{unique}/1/part-00000001.seg"
            await store.put(big, b"\0" * (12 << 20))  # multipart: create, 3 parts, complete
            await store.delete(big)
        finally:
            await keys.aclose()
            await store.aclose()

    billed: Counter[str] = Counter()
    for (_stream, dest, cls), n in values(sm, "billed").items():
        assert dest == "b"
        billed[cls] += int(n)
    seen = {c: n for c, n in proxy.counts.items() if n}
    assert {c: n for c, n in billed.items() if n} == seen
    assert seen["PUT"] >= len(refs) + 5 and seen["LIST"] >= 1 and seen["GET"] == 3
    cross = values(sm, "cross_region")
    assert sum(cross.values()) == proxy.put_bytes + proxy.get_bytes
    written = values(sm, "written_bytes")[(unique, "b")]
    assert written == proxy.put_bytes
    assert values(sm, "stored")[(unique, "b")] == written - first.size - (12 << 20)


# -- lab: `dragent report cost` on the cost log of a short real run ---------------------------


@pytest.mark.lab
async def test_report_cost_on_the_log_of_a_short_run(lab: Lab, tmp_path: Path, unique: str) -> None:
    pair = Pair(lab, tmp_path, unique)
    try:
        await pair.b.start()
        await pair.a.start()
        await pair.a.wait_ready()
        await eventually(lambda: _past(pair.a, "durable", 300), within=30)
        status = await pair.a.status()
        assert status is not None and status["cost"]["currency"] == "USD"
        assert status["cost"]["monthly"] >= 0
        assert await pair.a.stop() == 0  # the last sample is written as the agent stops
    finally:
        await pair.a.stop(grace=10)
        await pair.b.stop(grace=10)
    log = tmp_path / "a" / "cost.jsonl"
    samples = read_samples(log)
    assert len(samples) >= 2 and len({s["boot"] for s in samples}) == 1
    config = str(tmp_path / "a.toml")
    out = dragent("report", "cost", "--config", config, "--from", str(samples[0]["t"]), "--json")
    report = json.loads(out.stdout)
    print(json.dumps(report["streams"], indent=1))  # the figures, for the record
    assert report["log"] == str(log) and report["samples"] == len(samples)
    assert report["seconds"] == pytest.approx(samples[-1]["t"] - samples[0]["t"])
    rows = {(r["stream"], r["destination"]): r for r in report["streams"]}
    row = rows[(unique, "b")]
    assert row["kind"] == "synthetic" and row["pgbackrest"] is None
    assert row["requests"]["PUT"] >= 2  # at least a few segments
    assert row["written_objects"] == row["requests"]["PUT"]  # small segments: one PUT each
    assert row["cross_region_bytes"] >= row["written_bytes"] > 0
    assert row["stored_bytes"] == row["written_bytes"]  # nothing deleted
    assert row["raw_bytes"] > 0
    for part in ("cost", "crr", "crr_rtc"):
        assert set(row[part]) == {"requests", "transfer", "storage", "rtc", "monthly"}
        assert row[part]["monthly"] > 0
    assert row["crr_rtc"]["monthly"] > row["crr"]["monthly"]
    assert set(report["total_monthly"]) == {"dragent", "crr", "crr_rtc", "pgbackrest"}
    assert report["prices"]["region"] == "us-east-1" and report["formulas"]
    text = dragent("report", "cost", "--log", str(log), "--from", "0").stdout
    assert f"{unique} -> b" in text and "How the figures are made" in text
