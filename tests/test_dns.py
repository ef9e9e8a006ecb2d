"""Traffic switches: RFC 2136 against a real BIND 9, exec and webhook hooks.

Route 53 is tested against moto's server in ``tests/test_route53.py``.
"""

from __future__ import annotations

import base64
import secrets
import sys
from pathlib import Path

import pytest
from aiohttp import web

from agent.failover_config import ExecSwitch, Rfc2136Switch, WebhookSwitch
from agent.lab.bind import ADDRESSES, BindServer, resolve
from agent.switch import build_switch
from agent.switch.base import SwitchError
from agent.switch.hooks import ExecHook, WebhookHook
from agent.switch.rfc2136 import Rfc2136

pytestmark = pytest.mark.lab


async def test_rfc2136_moves_the_record_between_regions(named: BindServer) -> None:
    switch = build_switch(Rfc2136Switch(**named.switch_config()))
    assert isinstance(switch, Rfc2136)
    await switch.point_to("b")
    assert await resolve(named.port) == [ADDRESSES["b"]]
    await switch.point_to("b")  # idempotent
    assert await switch.current() == [ADDRESSES["b"]]
    await switch.point_to("a")
    assert await resolve(named.port) == [ADDRESSES["a"]]
    await switch.check_credentials()


async def test_rfc2136_refuses_a_switch_under_an_older_epoch(named: BindServer) -> None:
    """The epoch is a fencing token at the DNS server: recorded beside the record,
    compared before each switch, and the update conditional on it (a racing region's
    update fails its prerequisite and reads again)."""
    from agent.switch.base import StaleEpoch

    switch = build_switch(Rfc2136Switch(**named.switch_config()))
    assert isinstance(switch, Rfc2136)
    await switch.forget_epoch()
    await switch.point_to("b", epoch=3)
    assert await switch.recorded_epoch() == 3
    with pytest.raises(StaleEpoch, match="switched under epoch 3, refusing epoch 2"):
        await switch.point_to("a", epoch=2)
    assert await resolve(named.port) == [ADDRESSES["b"]]  # the stale region moved nothing
    await switch.point_to("b", epoch=3)  # the same epoch again: idempotent
    # a region that read epoch 3 but was overtaken before its update lands
    stale = switch.message("a", epoch=4, seen=2)
    assert await switch._send(stale) != 0
    assert await resolve(named.port) == [ADDRESSES["b"]]
    await switch.point_to("a", epoch=4)
    assert (await switch.recorded_epoch(), await resolve(named.port)) == (4, [ADDRESSES["a"]])
    await switch.point_to("a")  # a person, no epoch: allowed, the record stays
    assert await switch.recorded_epoch() == 4
    await switch.forget_epoch()
    assert await switch.recorded_epoch() is None


async def test_rfc2136_wrong_key_is_refused_and_nothing_changes(
    named: BindServer, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_text(base64.b64encode(secrets.token_bytes(32)).decode())
    cfg = Rfc2136Switch(**{**named.switch_config(), "tsig_secret": f"file:{wrong}"})
    before = await resolve(named.port)
    with pytest.raises(SwitchError, match=r"TSIG|NOTAUTH|not answered"):
        await Rfc2136(cfg).point_to("b" if before == [ADDRESSES["a"]] else "a")
    assert await resolve(named.port) == before


async def test_rfc2136_unknown_region_is_an_operator_error(named: BindServer) -> None:
    with pytest.raises(SwitchError, match="no record value configured for region 'c'"):
        await Rfc2136(Rfc2136Switch(**named.switch_config())).point_to("c")


async def test_exec_hook_substitutes_the_region(tmp_path: Path) -> None:
    out = tmp_path / "switched"
    code = f"open({str(out)!r}, 'w').write(__import__('sys').argv[1])"
    await ExecHook(ExecSwitch(argv=[sys.executable, "-c", code, "{region}"])).point_to("b")
    assert out.read_text() == "b"
    with pytest.raises(SwitchError, match="exited 3"):
        await ExecHook(ExecSwitch(argv=[sys.executable, "-c", "exit(3)"])).point_to("b")


async def test_webhook_hook_posts_the_region(monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[object] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/switch", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    monkeypatch.setenv("HOOK_URL", f"http://127.0.0.1:{port}/switch")
    try:
        hook_switch = WebhookHook(WebhookSwitch(url="env:HOOK_URL"))
        await hook_switch.point_to("b")
        await hook_switch.point_to("a", epoch=7)
        assert "127.0.0.1" not in repr(hook_switch.describe())
    finally:
        await runner.cleanup()
    assert got == [{"region": "b", "epoch": None}, {"region": "a", "epoch": 7}]
