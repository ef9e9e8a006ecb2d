"""``replicators.s3``'s botocore tuning: the same results as botocore's own ways, offline."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import botocore.utils
import pytest
from botocore.config import Config

from replicators import s3
from replicators.errors import Unavailable
from replicators.settings import S3Config

SAMPLES = [
    "2026-12-07T03:18:26.000Z",
    "2026-12-07T03:18:26Z",
    "2026-12-07T03:18:26.5Z",
    "2026-12-07T03:18:26.123456Z",
    "1999-12-31T23:59:59.999Z",
    "2024-02-29T00:00:00.000Z",
    "Mon, 07 Dec 2026 03:18:26 GMT",
    "Thu, 01 Jan 1970 00:00:00 GMT",
    "Sun, 29 Feb 2032 12:00:00 GMT",
    # not the fast forms: botocore's own parser
    "2026-12-07T03:18:26.1234567Z",
    "2026-12-07T03:18:26+02:00",
    "2026-12-07 03:18:26",
    "Mon, 7 Dec 2026 03:18:26 GMT",
    "Monday, 07-Dec-26 03:18:26 GMT",
    "1765077506",
    1765077506,
    1765077506.25,
]


@pytest.mark.parametrize("value", SAMPLES)
def test_parse_timestamp_is_botocores(value: Any) -> None:
    want = botocore.utils.parse_timestamp(value)
    got = s3.parse_timestamp(value)
    assert got == want
    assert got.utcoffset() == want.utcoffset()
    assert got.timestamp() == want.timestamp()
    assert str(got) == str(want)


@pytest.mark.parametrize("value", ["2026-02-30T00:00:00Z", "Tue, 31 Nov 2026 00:00:00 GMT", "x"])
def test_parse_timestamp_refuses_what_botocore_refuses(value: str) -> None:
    with pytest.raises(ValueError) as want:
        botocore.utils.parse_timestamp(value)
    with pytest.raises(ValueError) as got:
        s3.parse_timestamp(value)
    assert str(got.value) == str(want.value)


def _cfg() -> S3Config:
    return S3Config(
        endpoint="http://127.0.0.1:9",  # nothing is sent: the tests stop before sending
        bucket="b",
        access_key="env:PATH",
        secret_key="env:PATH",
        addressing_style="path",
    )


class _Stop(Exception):
    pass


async def _sent(tuning: s3.Tuning, op: str, **params: Any) -> dict[str, str]:
    """The headers of the request a client with ``tuning`` would send for ``op``."""
    seen: dict[str, str] = {}

    def stop(request: Any, **_: Any) -> None:
        seen.update(
            {k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        )
        raise _Stop

    async with s3.s3_client(_cfg(), tuning=tuning) as client:
        client.meta.events.register_last("before-send.s3", stop)
        with pytest.raises(_Stop):
            await getattr(client, op)(Bucket="b", **params)
    return seen


async def test_the_static_user_agent_is_botocores_without_feature_ids() -> None:
    want = (await _sent(s3.BOTOCORE, "head_object", Key="k"))["User-Agent"].split(" ")
    got = (await _sent(s3.TUNING, "head_object", Key="k"))["User-Agent"].split(" ")
    assert got == [part for part in want if not part.startswith("m/")]
    assert any(part.startswith("m/") for part in want)


async def test_the_static_user_agent_keeps_the_app_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SDK_UA_APP_ID", "dragent-test")
    want = (await _sent(s3.BOTOCORE, "head_object", Key="k"))["User-Agent"].split(" ")
    got = (await _sent(s3.TUNING, "head_object", Key="k"))["User-Agent"].split(" ")
    assert "app/dragent-test" in want
    assert got == [part for part in want if not part.startswith("m/")]


async def test_tuned_requests_differ_only_in_the_user_agent() -> None:
    ignore = {"User-Agent", "X-Amz-Date", "Authorization", "amz-sdk-invocation-id"}
    body = b"x" * 1000
    for op, params in [
        ("head_object", {"Key": "k"}),
        ("get_object", {"Key": "k", "Range": "bytes=0-9", "IfMatch": '"e"'}),
        ("put_object", {"Key": "k", "Body": body, "Metadata": {"a": "b"}}),
        ("put_object", {"Key": "k", "Body": body, "ChecksumCRC32C": s3.crc32c_header(body)}),
        ("list_objects_v2", {"Prefix": "p/", "MaxKeys": 1000}),
    ]:
        want = await _sent(s3.BOTOCORE, op, **params)
        got = await _sent(s3.TUNING, op, **params)
        assert {k: v for k, v in got.items() if k not in ignore} == {
            k: v for k, v in want.items() if k not in ignore
        }, op


def test_the_session_parses_timestamps_with_ours() -> None:
    parsers = s3._session(True).get_component("response_parser_factory")
    assert parsers.create_parser("rest-xml")._timestamp_parser is s3.parse_timestamp
    plain = s3._session(False).get_component("response_parser_factory")
    assert plain.create_parser("rest-xml")._timestamp_parser is botocore.utils.parse_timestamp


def test_user_agent_of_a_config() -> None:
    session = s3._session(s3.TUNING.fast_timestamps)
    ua = s3._user_agent(session, Config(retries={"mode": "standard"}))
    assert ua.startswith("aiobotocore/")
    assert "cfg/retry-mode#standard" in ua
    assert not ua.endswith(session.user_agent_extra)


@pytest.mark.parametrize("tuning", [s3.BOTOCORE, s3.TUNING])
async def test_an_empty_key_is_refused_before_sending(tuning: s3.Tuning) -> None:
    """botocore's parameter validation refuses it; with it off, ``S3Store`` does the same."""
    async with s3.s3_client(_cfg(), tuning=tuning) as client:
        store = s3.S3Store(_cfg(), client, AsyncExitStack())
        for call in (store.get(""), store.stat(""), store.put("", b"x")):
            with pytest.raises(Unavailable) as refused:
                await call
            assert "Invalid length for parameter Key, value: 0, valid min length: 1" in str(
                refused.value
            )
