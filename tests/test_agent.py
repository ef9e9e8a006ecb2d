"""The agent as operators run it: two processes, a real vault, signals, kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import tomli_w

from agent.agentproc import AgentProcess
from agent.config import load_config
from agent.lab import Lab
from replicators.keys import build_key_provider, unseal
from replicators.s3 import S3Store
from replicators.synthetic import parse_record, read_applied_log
from replicators.vault import Vault
from tests.support import eventually, lab_agent

pytestmark = pytest.mark.lab


def variant(lab: Lab, region: str, workdir: Path, stream: str, **top: Any) -> Path:
    """The lab's config for ``region`` with its own data dir and stream name."""
    data = tomllib.loads(lab.config_path(region).read_text())
    data["data_dir"] = str(workdir / region)
    data["streams"] = [
        {
            "name": stream,
            "kind": "synthetic",
            "segment_max_age": "100ms",
            "synthetic": {"rate": 500, "record_size": 256},
        }
    ]
    data.update(top)
    path = workdir / f"{region}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


class Pair:
    def __init__(self, lab: Lab, workdir: Path, stream: str) -> None:
        self.lab, self.workdir, self.stream = lab, workdir, stream
        self.a = self.agent("a")
        self.b = self.agent("b")

    def agent(self, region: str, **top: Any) -> AgentProcess:
        cfg = variant(self.lab, region, self.workdir, self.stream, **top)
        return lab_agent(self.lab, region, cfg, self.workdir)


@pytest_asyncio.fixture(loop_scope="session")
async def pair(lab: Lab, tmp_path: Path, unique: str) -> AsyncIterator[Pair]:
    p = Pair(lab, tmp_path, unique)
    try:
        yield p
    finally:
        await p.a.stop(grace=10)
        await p.b.stop(grace=10)


def stream_status(status: dict[str, Any] | None) -> dict[str, Any]:
    assert status is not None
    return status["streams"][0]


def position(status: dict[str, Any] | None, stage: str) -> int:
    mark = stream_status(status).get(stage)
    return int(mark["position"]) if mark else 0


async def vault_indices(lab: Lab, stream: str) -> list[int]:
    cfg = load_config(lab.config_path("b"))
    store = await S3Store.open(cfg.vault)
    keys = build_key_provider(cfg.keys)
    out: list[int] = []
    try:
        async for ref in Vault(store).segments(stream):
            opened = await unseal(await store.get(ref.key), keys, expect_stream=stream)
            out.extend(parse_record(r)[0] for r in opened.records)
    finally:
        await keys.aclose()
        await store.aclose()
    return out


async def test_kill_9_of_the_sender_loses_and_duplicates_nothing(pair: Pair) -> None:
    await pair.b.start()
    await pair.b.wait_ready()
    await pair.a.start()
    await pair.a.wait_ready()
    await eventually(lambda: _past(pair.a, "durable", 300), within=20)
    await pair.a.kill()  # kill -9, mid-stream
    await pair.a.start()
    await pair.a.wait_ready()
    await eventually(lambda: _past(pair.a, "durable", 600), within=20)
    assert await pair.a.stop() == 0  # SIGTERM: drain, exit 0
    shipped = load_state(pair.workdir / "a" / "streams" / pair.stream / "to-b" / "shipped.json")
    await eventually(lambda: _past(pair.b, "applied", shipped - 1), within=20)
    in_vault = await vault_indices(pair.lab, pair.stream)
    assert in_vault == list(range(shipped))  # every record once, in order
    target = pair.workdir / "b" / "streams" / pair.stream / "target" / "applied.log"
    applied = [parse_record(r)[0] for r in read_applied_log(target)]
    assert applied == in_vault


async def test_kill_9_of_the_receiver_mid_apply_loses_and_duplicates_nothing(pair: Pair) -> None:
    """The passive agent is killed -9 three times while it applies (10 segments a
    second): each restart resumes from its target's state, and the applied log holds
    every record of the vault once, in order."""
    await pair.a.start()
    await pair.b.start()
    await pair.a.wait_ready()
    await pair.b.wait_ready()
    for at in (150, 400, 650):
        await eventually(lambda at=at: _past(pair.b, "applied", at), within=20)  # type: ignore[misc]
        await pair.b.kill()
        await pair.b.start()
        await pair.b.wait_ready()
    assert await pair.a.stop() == 0
    shipped = load_state(pair.workdir / "a" / "streams" / pair.stream / "to-b" / "shipped.json")
    await eventually(lambda: _past(pair.b, "applied", shipped - 1), within=30)
    in_vault = await vault_indices(pair.lab, pair.stream)
    assert in_vault == list(range(shipped))
    target = pair.workdir / "b" / "streams" / pair.stream / "target" / "applied.log"
    assert [parse_record(r)[0] for r in read_applied_log(target)] == in_vault


def load_state(path: Path) -> int:
    import json

    return int(json.loads(path.read_text())["end"])


async def _past(agent: AgentProcess, stage: str, n: int) -> bool:
    status = await agent.status()
    return status is not None and bool(status["streams"]) and position(status, stage) > n


async def test_status_and_metrics_show_watermarks_and_rpo(pair: Pair) -> None:
    await pair.b.start()
    await pair.a.start()
    await pair.a.wait_ready()
    await pair.b.wait_ready()
    await eventually(lambda: _past(pair.b, "applied", 200), within=20)
    sa, sb = await pair.a.status(), await pair.b.status()
    assert sa is not None and sb is not None
    assert (sa["region"], sa["role"], sa["epoch"]) == ("a", "active", 1)
    assert (sb["region"], sb["role"]) == ("b", "passive")
    src, dst = stream_status(sa), stream_status(sb)
    # agents started outside the lab show as running in `dragent lab status`
    regions = pair.lab.status()["regions"]
    assert regions["a"]["agent"]["state"] == regions["b"]["agent"]["state"] == "running"
    assert src["side"] == "source" and src["peer"] == "b"
    assert 0 <= src["rpo_seconds"] < 5
    assert position(sa, "durable") <= position(sa, "captured")
    assert position(sb, "verified") == position(sb, "applied") > 200
    assert dst["apply_lag_seconds"] is not None
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{pair.a.url}/metrics") as resp:
            text = await resp.text()
        assert f'dragent_rpo_seconds{{peer="b",stream="{pair.stream}"}}' in text
        assert "dragent_replication_latency_seconds_bucket" in text
        assert 'dragent_role{role="active"} 1.0' in text
        async with http.get(f"{pair.b.url}/metrics") as resp:
            text = await resp.text()
        assert (
            f'dragent_watermark_position{{peer="vault",stream="{pair.stream}",watermark="applied"}}'
            in text
        )
        assert f'dragent_apply_lag_seconds{{stream="{pair.stream}"}}' in text


async def test_bearer_token_guards_everything_but_metrics_and_healthz(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    http_cfg = tomllib.loads(pair.lab.config_path("b").read_text())["http"]
    token_file = pair.workdir / "token"
    token_file.write_text("t0ps3cret\n")
    b = pair.agent("b", http={**http_cfg, "token": f"file:{token_file}"})
    pair.b = b
    await b.start()
    async with aiohttp.ClientSession() as http:
        await eventually(lambda: _answers(http, f"{b.url}/healthz"), within=20)
        for path, expected in (
            ("/metrics", 200),
            ("/healthz", 200),
            ("/status", 401),
            ("/readyz", 401),
        ):
            async with http.get(b.url + path) as resp:
                assert resp.status == expected, path
        headers = {"Authorization": "Bearer t0ps3cret"}
        async with http.get(f"{b.url}/status", headers=headers) as resp:
            assert resp.status == 200
        async with http.get(f"{b.url}/status", headers={"Authorization": "Bearer nope"}) as resp:
            assert resp.status == 401
        # a new token in the file and SIGHUP: the old one is refused, the new one works
        token_file.write_text("n3wt0ken\n")
        assert b.proc is not None
        b.proc.send_signal(signal.SIGHUP)

        async def new_token_works() -> bool:
            new = {"Authorization": "Bearer n3wt0ken"}
            async with http.get(f"{b.url}/status", headers=new) as resp:
                return resp.status == 200

        await eventually(new_token_works, within=20)
        async with http.get(f"{b.url}/status", headers=headers) as resp:
            assert resp.status == 401
    assert "t0ps3cret" not in b.log_path.read_text()
    assert "n3wt0ken" not in b.log_path.read_text()


async def _answers(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url) as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def test_sighup_reloads_a_valid_config_and_refuses_a_broken_one(pair: Pair) -> None:
    await pair.b.start()
    await pair.b.wait_ready()
    assert (await pair.b.status() or {})["generation"] == 1
    assert pair.b.proc is not None
    good = pair.b.config.read_text()
    pair.b.config.write_text(good.replace('level = "info"', 'level = "debug"'))
    pair.b.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: _generation(pair.b, 2), within=20)
    pair.b.config.write_text(good.replace('kind = "synthetic"', 'kind = "nonsense"'))
    pair.b.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(1.0)
    assert await _generation(pair.b, 2)
    await pair.b.wait_ready()
    assert "reload refused: invalid configuration" in pair.b.log_path.read_text()


async def _generation(agent: AgentProcess, n: int) -> bool:
    status = await agent.status()
    return status is not None and status["generation"] == n


async def test_systemd_notify_ready_and_watchdog(pair: Pair) -> None:
    path = pair.workdir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        await pair.b.start(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        messages: list[str] = []

        def drain() -> bool:
            while True:
                try:
                    messages.append(sock.recv(4096).decode())
                except BlockingIOError:
                    break
            text = "\n".join(messages)
            return "READY=1" in text and text.count("WATCHDOG=1") >= 3

        await eventually(drain, within=20)
        assert any(m.startswith("READY=1\nSTATUS=b passive") for m in messages)
        await pair.b.stop()
        drain()
        assert "STOPPING=1" in messages[-1]
    finally:
        sock.close()
        os.unlink(path)


async def test_tls_with_client_certificates(pair: Pair) -> None:
    import ssl

    from tests.tlsutil import make_ca

    ca, server, client = make_ca(pair.workdir)
    http_cfg = tomllib.loads(pair.lab.config_path("b").read_text())["http"]
    tls = {
        **http_cfg,
        "tls_cert": str(server),
        "tls_key": str(server.with_suffix(".key")),
        "tls_client_ca": str(ca),
    }
    b = pair.agent("b", http=tls)
    pair.b = b
    await b.start()
    url = b.url.replace("http://", "https://")
    trusting = ssl.create_default_context(cafile=str(ca))
    with_cert = ssl.create_default_context(cafile=str(ca))
    with_cert.load_cert_chain(client, client.with_suffix(".key"))

    async def healthz(ctx: ssl.SSLContext) -> int | None:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz", ssl=ctx) as r:
                return r.status
        except (aiohttp.ClientError, ssl.SSLError, OSError):
            return None

    await eventually(lambda: _is(healthz(with_cert), 200), within=20)
    assert await healthz(trusting) is None  # no client certificate: handshake refused
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.get(f"{b.url}/healthz") as _:  # plain HTTP on a TLS port
                pass


async def _is(value: Any, expected: Any) -> bool:
    return (await value) == expected
