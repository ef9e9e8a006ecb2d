"""``S3Config.data_client = "obstore"``: the hot requests of ``S3Store`` and ``Bucket``
through obstore give what botocore gives (states, bytes, errors), and whatever obstore
would not send unchanged goes through botocore."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from obstore import exceptions as obx

from agent.config import AgentConfig
from replicators import s3_obstore
from replicators.bucket import Bucket
from replicators.errors import AccessDenied, AlreadyExists, NotFound, Unavailable
from replicators.s3 import S3Store
from replicators.settings import S3Config


@pytest.mark.parametrize(
    ("key", "exact"),
    [
        ("a", True),
        ("d/000001", True),
        ("sp ace+plus%25#?*~é[]{}^|<>\\`\"'", True),
        ("a.b/..c/.d", True),
        ("", False),
        ("dir/", False),
        ("/lead", False),
        ("a//b", False),
        ("a/./b", False),
        ("a/../b", False),
        (".", False),
        ("tab\tkey", False),
        ("nl\nkey", False),
        ("del\x7fkey", False),
    ],
)
def test_exact_keys(key: str, exact: bool) -> None:
    assert s3_obstore.exact_key(key) is exact


@pytest.mark.parametrize(
    ("metadata", "plain"),
    [
        ({}, True),
        ({"dragent-version": "1.2", "Mixed-Case": "v"}, True),
        ({"content-type": "x"}, False),
        ({"Cache-Control": "x"}, False),
        ({"STORAGE-CLASS": "x"}, False),
        ({"k": "ü"}, False),
        ({"ü": "v"}, False),
    ],
)
def test_plain_metadata(metadata: dict[str, str], plain: bool) -> None:
    assert s3_obstore.plain_metadata(metadata) is plain


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (FileNotFoundError("Object at location k not found"), NotFound),
        (obx.PreconditionError("412"), AlreadyExists),
        (obx.AlreadyExistsError("exists"), AlreadyExists),
        (obx.PermissionDeniedError("403"), AccessDenied),
        (obx.UnauthenticatedError("401"), AccessDenied),
        (obx.GenericError("500 after retries"), Unavailable),
        (TimeoutError(), Unavailable),
        (FileNotFoundError("...<Code>NoSuchBucket</Code>..."), AccessDenied),
    ],
)
def test_errors_are_the_stores(exc: Exception, kind: type) -> None:
    got = s3_obstore.classify(exc, "k")
    assert type(got) is kind and got.key == "k"


def _cfg(**changes: Any) -> S3Config:
    os.environ.setdefault("OBSTORE_TEST_KEY", "k")
    base: dict[str, Any] = {
        "endpoint": "http://127.0.0.1:9",
        "bucket": "b",
        "addressing_style": "path",
        "access_key": "env:OBSTORE_TEST_KEY",
        "secret_key": "env:OBSTORE_TEST_KEY",
    }
    return S3Config(**(base | changes))


def test_obstore_only_where_it_stands_in_for_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    assert s3_obstore.FastS3.open(_cfg()) is not None
    assert s3_obstore.FastS3.open(_cfg(endpoint=None, addressing_style="auto")) is not None
    assert s3_obstore.FastS3.open(_cfg(access_key=None, secret_key=None)) is None
    assert s3_obstore.FastS3.open(_cfg(addressing_style="auto")) is None
    assert (
        s3_obstore.FastS3.open(_cfg(endpoint=None, addressing_style="auto", bucket="a.b")) is None
    )
    https = _cfg(endpoint="https://127.0.0.1:9")
    monkeypatch.setenv("AWS_CA_BUNDLE", "/nonexistent/bundle.pem")
    assert s3_obstore.FastS3.open(_cfg()) is not None  # plain HTTP: no CA involved
    assert s3_obstore.FastS3.open(https) is None  # botocore says what is wrong with it
    monkeypatch.delenv("AWS_CA_BUNDLE")
    assert s3_obstore.FastS3.open(https) is not None
    monkeypatch.setenv("https_proxy", "http://proxy:3128")
    assert s3_obstore.FastS3.open(_cfg()) is None


# -- against the lab's SeaweedFS -------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def pair(cfg_a: AgentConfig, unique: str) -> AsyncIterator[tuple[Bucket, Bucket]]:
    """The same prefix of the lab's vault bucket through botocore and through obstore."""
    cfg = cfg_a.vault.model_copy(update={"prefix": f"obstore/{unique}/"})
    boto = await Bucket.open(cfg.model_copy(update={"data_client": "botocore"}))
    fast = await Bucket.open(cfg.model_copy(update={"data_client": "obstore"}))
    assert boto._fast is None and fast._fast is not None
    try:
        yield boto, fast
    finally:
        await boto.aclose()
        await fast.aclose()


async def _outcome(call: Any) -> tuple[str, Any]:
    try:
        return "ok", await call
    except Exception as exc:
        return "error", type(exc).__name__


@pytest.mark.lab
async def test_obstore_reads_and_writes_as_botocore(pair: tuple[Bucket, Bucket]) -> None:
    boto, fast = pair
    body = os.urandom(50_000)
    meta = {"Mixed-Case": "v", "dragent-version": "1.2", "content-typo": "x"}
    for name, bucket in (("boto", boto), ("fast", fast)):
        await bucket.write(f"{name}/typed", body, "text/x-a", meta)
        await bucket.write(f"{name}/untyped", body, "", {})
        await bucket.create(f"{name}/created", body, "image/png", meta)
        with pytest.raises(AlreadyExists):
            await bucket.create(f"{name}/created", b"", "", {})
        await bucket.put(f"{name}/segment", body, if_absent=True, metadata={"k": "v"})
        with pytest.raises(AlreadyExists):
            await bucket.put(f"{name}/segment", body, if_absent=True)
    for key in [f"{w}/{k}" for w in ("boto", "fast") for k in ("typed", "untyped", "created")]:
        state = await boto.head(key)
        assert await fast.head(key) == state
        assert await fast.fetch(key, 1 << 20) == await boto.fetch(key, 1 << 20) == (state, body)
        assert await fast.fetch(key, 100) == await boto.fetch(key, 100) == (state, None)
        assert await fast.fetch(key, 1 << 20, state.etag) == (state, None)
        assert await fast.stat(key) == await boto.stat(key)
        assert await fast.get(key) == body
        for start, end in ((None, None), (10, 20), (0, 1), (49_990, 60_000)):
            part = body[start:end]
            assert await fast.read(key, state.etag, start, end) == part
            assert await boto.read(key, state.etag, start, end) == part
        assert await fast.read(key, "", 5, 9) == body[5:9]
        for bucket in (boto, fast):
            with pytest.raises(AlreadyExists):
                await bucket.read(key, "0" * 32)
    for key in ("boto/segment", "fast/segment"):
        assert await fast.stat(key) == await boto.stat(key)
        assert await fast.get(key) == await boto.get(key) == body
        for bucket in (boto, fast):
            assert await _outcome(bucket.get(key, max_bytes=100)) == ("error", "IntegrityError")


@pytest.mark.lab
async def test_obstore_errors_as_botocore(pair: tuple[Bucket, Bucket]) -> None:
    boto, fast = pair
    for key in ("missing", "dir/", "a//b"):
        for op, args in (("head", ()), ("fetch", (10,)), ("read", ("",)), ("stat", ())):
            got = await _outcome(getattr(fast, op)(key, *args))
            assert got == await _outcome(getattr(boto, op)(key, *args)) == ("error", "NotFound")
        assert await _outcome(fast.get(key)) == ("error", "NotFound")
    # metadata botocore refuses: refused the same way
    refused = await _outcome(fast.write("k", b"", "", {"k": "ü"}))
    assert (
        refused == await _outcome(boto.write("k", b"", "", {"k": "ü"})) == ("error", "Unavailable")
    )


@pytest.mark.lab
async def test_keys_obstore_would_change_are_written_by_botocore(
    pair: tuple[Bucket, Bucket],
) -> None:
    boto, fast = pair
    keys = ["odd/dir/", "odd/sp ace+%25#?*~é"]  # obstore would write "odd/dir"
    for key in [*keys, "odd/x//y"]:  # (SeaweedFS itself stores "a//b" as "a/b")
        await fast.write(key, key.encode(), "", {})
        assert await fast.fetch(key, 1000) == await boto.fetch(key, 1000)
    listed = [state.key async for page in boto.scan("odd/") for state in page]
    assert [k for k in listed if not k.startswith("odd/x")] == sorted(keys)


@pytest.mark.lab
async def test_a_vault_store_puts_and_gets_through_obstore(cfg_a: AgentConfig, unique: str) -> None:
    cfg = cfg_a.vault.model_copy(update={"prefix": f"obstore/{unique}/"})
    store = await S3Store.open(cfg, sign_payload=False)  # as the vault opens it
    try:
        assert store._fast_for("streams/s/0000000001/00000000000000000001.seg") is not None
        await store.put("seg", b"sealed", if_absent=True)
        with pytest.raises(AlreadyExists):
            await store.put("seg", b"other", if_absent=True)
        assert await store.get("seg") == b"sealed"
        assert (await store.stat("seg")).size == 6
    finally:
        await store.aclose()
