"""Key providers: the local key file (round trip, rotation, permissions, errors) and AWS KMS.

The AWS KMS provider is tested against moto's server (the session's ``moto_server``,
``tests/moto.py``, from the virtualenv ``.venv-moto`` that ``make venv`` builds),
which speaks the KMS protocol: keys and aliases, GenerateDataKey, Decrypt with
the encryption context, DescribeKey, disabled keys. A hung server is a real
SIGSTOP of its process.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session

from agent.config import KeysConfig
from agent.lab.moto import MotoServer
from replicators.errors import IntegrityError, KeyAccessError, Unavailable
from replicators.keys import (
    KMS_CONTEXT,
    AwsKmsKeyProvider,
    LocalKeyProvider,
    build_key_provider,
    generate_key_file,
    rotate_key_file,
    unseal,
)
from replicators.segment import DataKey, read_header, seal

pytestmark = pytest.mark.timeout(30)


def sealed(key: DataKey, records: list[bytes], seq: int = 1) -> bytes:
    return seal(
        records, stream="objects", epoch=1, seq=seq, start="0", end=str(len(records)),
        first_source_time=1.0, last_source_time=2.0, data_key=key, created_at=3.0,
    )  # fmt: skip


def current_id(path: Path) -> str:
    return str(json.loads(path.read_text())["current"])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- local key file ---------------------------------------------------------------------------


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "kek.json"
    generate_key_file(path)
    return path


def test_generated_key_file_is_private_and_never_overwritten(key_file: Path) -> None:
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    doc = json.loads(key_file.read_text())
    assert doc["current"] in doc["keys"] and len(bytes.fromhex(doc["keys"][doc["current"]])) == 32
    before = key_file.read_bytes()
    with pytest.raises(FileExistsError):
        generate_key_file(key_file)
    assert key_file.read_bytes() == before
    assert [p.name for p in key_file.parent.iterdir()] == ["kek.json"]  # no temporary left


def test_rotation_keeps_old_versions_and_stays_private(key_file: Path) -> None:
    first = current_id(key_file)
    second = rotate_key_file(key_file)
    doc = json.loads(key_file.read_text())
    assert doc["current"] == second != first and set(doc["keys"]) == {first, second}
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with pytest.raises(KeyAccessError):
        rotate_key_file(key_file.with_name("missing.json"))


async def test_local_round_trip_and_reuse(key_file: Path) -> None:
    clock = Clock()
    keys = LocalKeyProvider(key_file, data_key_reuse=60, clock=clock)
    key = await keys.data_key()
    assert key.key_id == current_id(key_file)
    assert await keys.data_key() is key  # reused within the window
    blob = sealed(key, [b"a", b"b"])
    assert (await unseal(blob, keys, expect_stream="objects", expect_seq=1)).records == [b"a", b"b"]
    fresh = LocalKeyProvider(key_file)  # another process: unwraps from the file
    assert (await unseal(blob, fresh)).records == [b"a", b"b"]
    clock.now += 61
    assert (await keys.data_key()).plaintext != key.plaintext
    assert key.plaintext.hex() not in repr(keys) + repr(key)
    await keys.aclose()
    await fresh.aclose()


async def test_rotation_is_picked_up_without_restart(key_file: Path) -> None:
    keys = LocalKeyProvider(key_file, data_key_reuse=3600)
    old = await keys.data_key()
    old_blob = sealed(old, [b"before rotation"])
    new_id = rotate_key_file(key_file)
    new = await keys.data_key()
    assert new.key_id == new_id != old.key_id
    assert read_header(sealed(new, [b"x"])).key_id == new_id
    assert (await unseal(old_blob, keys)).records == [b"before rotation"]
    assert (await unseal(old_blob, LocalKeyProvider(key_file))).records == [b"before rotation"]


async def test_unknown_key_id_and_tampered_wrapped_key(key_file: Path, tmp_path: Path) -> None:
    keys = LocalKeyProvider(key_file)
    key = await keys.data_key()
    with pytest.raises(KeyAccessError, match="not in key file"):
        await keys.unwrap("k-unknown", key.wrapped)
    tampered = key.wrapped[:-1] + bytes([key.wrapped[-1] ^ 1])
    with pytest.raises(IntegrityError, match="failed authentication"):
        await keys.unwrap(key.key_id, tampered)
    with pytest.raises(IntegrityError, match="malformed"):
        await keys.unwrap(key.key_id, b"short")
    other = tmp_path / "other.json"
    generate_key_file(other)
    with pytest.raises(KeyAccessError):  # a segment from a region whose key we lack
        await unseal(sealed(await LocalKeyProvider(other).data_key(), [b"x"]), keys)


async def test_unreadable_or_invalid_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyAccessError, match="cannot read"):
        await LocalKeyProvider(tmp_path / "absent.json").data_key()
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "dragent-kek/1", "current": "k", "keys": {"k": "zz"}}')
    bad.chmod(0o600)
    with pytest.raises(KeyAccessError, match="not hex"):
        await LocalKeyProvider(bad).data_key()
    bad.write_text("not json")
    with pytest.raises(KeyAccessError, match="not valid JSON"):
        await LocalKeyProvider(bad).data_key()


async def test_a_key_file_others_may_read_is_refused_with_the_fix(key_file: Path) -> None:
    for mode in (0o640, 0o604, 0o660):
        os.chmod(key_file, mode)
        with pytest.raises(KeyAccessError, match=f"mode {mode:o}") as caught:
            await LocalKeyProvider(key_file).data_key()
        assert caught.value.hint == f"chmod 600 {key_file}"
    os.chmod(key_file, 0o600)
    assert (await LocalKeyProvider(key_file).data_key()).key_id


def test_build_key_provider(key_file: Path) -> None:
    local = build_key_provider(KeysConfig(provider="local", key_file=key_file))
    assert isinstance(local, LocalKeyProvider) and local.KIND == "local"
    kms = build_key_provider(
        KeysConfig(provider="aws-kms", kms_key_id="alias/dr", kms_endpoint="http://127.0.0.1:1")
    )
    assert isinstance(kms, AwsKmsKeyProvider) and kms.KIND == "aws-kms"


# --- AWS KMS, against a real KMS protocol server (moto in server mode) -------------------


NAMES = {
    "generate_data_key": "GenerateDataKey",
    "decrypt": "Decrypt",
    "describe_key": "DescribeKey",
}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Static test credentials; no shared config, no instance metadata."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)


@dataclass
class Kms:
    url: str
    server: MotoServer
    arn: str
    alias: str
    calls: list[str]


@pytest.fixture
async def kms(
    aws_env: None, moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Kms]:
    """A fresh KMS key with an alias on the session's moto server, and the KMS operations
    the provider sends, in order."""
    url = moto_server.endpoint
    session = get_session()
    async with session.create_client("kms", region_name="us-east-1", endpoint_url=url) as c:
        arn = (await c.create_key())["KeyMetadata"]["Arn"]
        alias = f"alias/dr-{secrets.token_hex(6)}"
        await c.create_alias(AliasName=alias, TargetKeyId=arn)
    calls: list[str] = []
    real = AwsKmsKeyProvider._call

    async def counted(self: AwsKmsKeyProvider, operation: str, *a: Any, **k: Any) -> Any:
        calls.append(NAMES.get(operation, operation))
        return await real(self, operation, *a, **k)

    monkeypatch.setattr(AwsKmsKeyProvider, "_call", counted)
    yield Kms(url, moto_server, arn, alias, calls)


async def test_kms_round_trip_reuse_and_cache(kms: Kms) -> None:
    clock = Clock()
    keys = AwsKmsKeyProvider(kms.alias, endpoint_url=kms.url, data_key_reuse=60, clock=clock)
    try:
        key = await keys.data_key()
        assert key.key_id == kms.arn and len(key.plaintext) == 32
        assert await keys.data_key() is key
        assert kms.calls == ["GenerateDataKey"]
        blob = sealed(key, [b"weights", b"manifest"])
        other = AwsKmsKeyProvider(kms.alias, endpoint_url=kms.url)
        try:
            assert (await unseal(blob, other, expect_seq=1)).records == [b"weights", b"manifest"]
            await unseal(blob, other)
            # the alias is resolved once (DescribeKey) to accept the ARN; unwrap is cached
            assert kms.calls == ["GenerateDataKey", "DescribeKey", "Decrypt"]
        finally:
            await other.aclose()
        clock.now += 61
        assert (await keys.data_key()).plaintext != key.plaintext
    finally:
        await keys.aclose()
    assert key.plaintext.hex() not in repr(keys)


async def test_kms_errors_are_classified(kms: Kms) -> None:
    keys = AwsKmsKeyProvider(kms.arn, endpoint_url=kms.url)
    slow = AwsKmsKeyProvider(kms.arn, endpoint_url=kms.url, timeout=0.3)
    try:
        key = await keys.data_key()
        tampered = key.wrapped[:-1] + bytes([key.wrapped[-1] ^ 1])
        with pytest.raises(IntegrityError, match="InvalidCiphertextException"):
            await keys.unwrap(key.key_id, tampered)
        before = len(kms.calls)
        other_key = "arn:aws:kms:us-east-1:123456789012:key/0000aaaa-00aa-00aa-00aa-000000aaaaaa"
        with pytest.raises(KeyAccessError, match="refused before Decrypt"):
            await keys.unwrap(other_key, key.wrapped)
        assert "Decrypt" not in kms.calls[before:]  # never sent to KMS
        allowing = AwsKmsKeyProvider(kms.arn, endpoint_url=kms.url, allowed=[other_key])
        # an older key on the allow-list is asked for; KMS refusing it (this server has no
        # such key) is a KeyAccessError, not retried (moto does not enforce disabled keys)
        try:
            with pytest.raises(KeyAccessError, match="NotFoundException"):
                await allowing.unwrap(other_key, key.wrapped)
        finally:
            await allowing.aclose()
        kms.server.pause()  # the server hangs (SIGSTOP): no answer in time
        try:
            with pytest.raises(Unavailable, match="no answer"):
                await slow.unwrap(key.key_id, os.urandom(60))
        finally:
            kms.server.resume()
    finally:
        await keys.aclose()
        await slow.aclose()


async def test_kms_unreachable_is_unavailable(aws_env: None, unused_tcp_port: int) -> None:
    keys = AwsKmsKeyProvider(
        "alias/dr", endpoint_url=f"http://127.0.0.1:{unused_tcp_port}", timeout=5
    )
    try:
        with pytest.raises(Unavailable):
            await keys.data_key()
    finally:
        await keys.aclose()


def test_kms_context_is_fixed() -> None:
    assert KMS_CONTEXT == {"purpose": "dragent-segment"}
