"""The Route 53 switch against moto's server (the session's ``moto_server``), which speaks
the Route 53 protocol: hosted zones, ChangeResourceRecordSets (UPSERT, a name outside
the zone refused), ListResourceRecordSets to read the records back, GetChange.

moto reports every change INSYNC at once, where Route 53 answers PENDING for about a
minute. To drive the wait, a botocore ``after-call`` hook on the switch's session
rewrites the parsed status to PENDING (the requests, the change and the GetChange
calls still go to moto); a Route 53 that does not answer is a SIGSTOP of the server.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiobotocore.session import AioSession, get_session

from agent.failover_config import Route53Switch
from agent.lab.moto import MotoServer
from agent.switch import build_switch
from agent.switch import route53 as route53_module
from agent.switch.base import SwitchError
from agent.switch.route53 import Route53
from tests.moto import client

pytestmark = pytest.mark.timeout(60)
RECORDS = {"a": "192.0.2.1", "b": "192.0.2.2"}


async def _zone(moto: MotoServer) -> tuple[str, str]:
    """A new hosted zone on moto: (its id without ``/hostedzone/``, its name)."""
    name = f"dr-{secrets.token_hex(4)}.example.com."
    async with client(moto, "route53") as r53:
        made = await r53.create_hosted_zone(Name=name, CallerReference=secrets.token_hex(8))
    return made["HostedZone"]["Id"].rpartition("/")[2], name


async def _records(moto: MotoServer, zone: str) -> dict[tuple[str, str], list[str]]:
    """(name, type) → values of every record set in the zone, read back from moto."""
    async with client(moto, "route53") as r53:
        answer = await r53.list_resource_record_sets(HostedZoneId=zone)
    return {
        (r["Name"], r["Type"]): [v["Value"] for v in r.get("ResourceRecords", [])]
        for r in answer["ResourceRecordSets"]
    }


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[Callable[..., None]]]:
    """The Route 53 operations the switch sends, in order; and a list to which a test
    adds ``after-call`` hooks (``hook(operation, parsed)``) run on every answer."""
    sent: list[str] = []
    hooks: list[Callable[..., None]] = []

    def session() -> AioSession:
        s = get_session()

        def before(model: Any, **_: Any) -> None:
            sent.append(model.name)

        def after(model: Any, parsed: dict[str, Any], **_: Any) -> None:
            for hook in hooks:
                hook(model.name, parsed)

        s.register("before-call.route-53", before)
        s.register("after-call.route-53", after)
        return s

    monkeypatch.setattr(route53_module, "get_session", session)
    monkeypatch.setenv("R53_AK", "AKIDEXAMPLE")
    monkeypatch.setenv("R53_SK", "secret")
    return sent, hooks


def _switch(moto: MotoServer, zone: str, name: str, **extra: Any) -> Route53:
    cfg = Route53Switch(
        hosted_zone_id=zone,
        name=f"app.{name}",
        records=RECORDS,
        endpoint=moto.endpoint,
        access_key="env:R53_AK",
        secret_key="env:R53_SK",
    )
    switch = build_switch(cfg)
    assert isinstance(switch, Route53)
    for key, value in extra.items():
        setattr(switch, key, value)
    return switch


async def test_route53_points_the_record_and_records_the_epoch(
    moto_server: MotoServer, calls: tuple[list[str], list[Callable[..., None]]]
) -> None:
    sent, _ = calls
    zone, name = await _zone(moto_server)
    switch = _switch(moto_server, zone, name)
    await switch.point_to("b", epoch=7)
    records = await _records(moto_server, zone)
    assert records[(f"app.{name}", "A")] == [RECORDS["b"]]
    assert records[(f"_dragent-epoch.app.{name}", "TXT")] == ['"epoch=7"']
    # moto answers INSYNC at once: nothing to wait for, no GetChange
    assert sent == ["ChangeResourceRecordSets"]
    await switch.point_to("b", epoch=7)  # idempotent
    await switch.point_to("a")  # a person, no epoch: the record moves, the epoch stays
    records = await _records(moto_server, zone)
    assert records[(f"app.{name}", "A")] == [RECORDS["a"]]
    assert records[(f"_dragent-epoch.app.{name}", "TXT")] == ['"epoch=7"']
    assert sent == ["ChangeResourceRecordSets"] * 3


async def test_route53_waits_until_the_change_is_insync(
    moto_server: MotoServer, calls: tuple[list[str], list[Callable[..., None]]]
) -> None:
    sent, hooks = calls
    zone, name = await _zone(moto_server)
    change_ids: list[str] = []
    pending = {"GetChange": 2}  # the change answers PENDING, then two GetChange too

    def route53_is_slow(operation: str, parsed: dict[str, Any]) -> None:
        info = parsed.get("ChangeInfo")
        if info is None:
            return
        change_ids.append(info["Id"].rpartition("/")[2])
        if operation == "ChangeResourceRecordSets" or pending.get(operation, 0) > 0:
            pending[operation] = pending.get(operation, 0) - 1
            info["Status"] = "PENDING"

    hooks.append(route53_is_slow)
    await _switch(moto_server, zone, name, poll=0.05).point_to("b", epoch=3)
    assert sent == ["ChangeResourceRecordSets", *["GetChange"] * 3]
    assert len(set(change_ids)) == 1  # each GetChange named the change made (moto echoes it)
    assert (await _records(moto_server, zone))[(f"app.{name}", "A")] == [RECORDS["b"]]


async def test_route53_change_not_insync_in_time_fails_the_switch(
    moto_server: MotoServer, calls: tuple[list[str], list[Callable[..., None]]]
) -> None:
    sent, hooks = calls
    zone, name = await _zone(moto_server)

    def never_insync(operation: str, parsed: dict[str, Any]) -> None:
        if "ChangeInfo" in parsed:
            parsed["ChangeInfo"]["Status"] = "PENDING"

    hooks.append(never_insync)
    switch = _switch(moto_server, zone, name, poll=0.1, within=1.0)
    started = time.monotonic()
    with pytest.raises(SwitchError, match=r"change still PENDING, not INSYNC, in 1s"):
        await switch.point_to("a")
    assert time.monotonic() - started < 2.5
    assert sent[0] == "ChangeResourceRecordSets" and sent.count("GetChange") >= 3
    # the change was made (Route 53 has no undo); the switch reports it as not done
    assert (await _records(moto_server, zone))[(f"app.{name}", "A")] == [RECORDS["a"]]


async def test_route53_that_does_not_answer_fails_the_switch_in_time(
    moto_server: MotoServer, calls: tuple[list[str], list[Callable[..., None]]]
) -> None:
    zone, name = await _zone(moto_server)
    switch = _switch(moto_server, zone, name, within=1.5)
    moto_server.pause()  # SIGSTOP: connections are accepted, nothing answers
    started = time.monotonic()
    try:
        with pytest.raises(SwitchError, match=r"route53 app\.dr-.*(not answered|[Tt]imeout)"):
            await switch.point_to("b", epoch=1)
    finally:
        moto_server.resume()
    assert time.monotonic() - started < 4


async def test_route53_refusals_are_switch_errors(
    moto_server: MotoServer, calls: tuple[list[str], list[Callable[..., None]]]
) -> None:
    zone, name = await _zone(moto_server)
    with pytest.raises(SwitchError, match="NoSuchHostedZone"):
        await _switch(moto_server, "Z0000000000000000000", name).point_to("a")
    with pytest.raises(SwitchError, match="no record value configured for region 'c'"):
        await _switch(moto_server, zone, name).point_to("c")
    outside = _switch(moto_server, zone, "elsewhere.example.org.")
    with pytest.raises(SwitchError, match=r"route53 app\.elsewhere\.example\.org\."):
        await outside.point_to("a")
    assert (f"app.{name}", "A") not in await _records(moto_server, zone)
