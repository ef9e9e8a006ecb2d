"""Stores that would build the same S3 client share one (``replicators.s3_clients``), and
one TLS context per CA bundle serves every botocore client (``replicators.s3_tls``):
shared where the inputs are the same, separate where any differs, and a store closed
never takes a client from under another one (requests against the lab's SeaweedFS)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from botocore.httpsession import get_cert_path

from agent.config import AgentConfig
from replicators import s3_clients, s3_obstore
from replicators.errors import NotFound
from replicators.s3 import S3Store
from replicators.s3_tls import SharedTLSSession


@pytest.mark.asyncio(loop_scope="session")
async def test_alike_stores_share_one_client(cfg_a: AgentConfig, unique: str) -> None:
    base = cfg_a.vault.model_copy(update={"prefix": f"clients/{unique}/"})
    before = s3_clients.open_clients()
    one = await S3Store.open(base)
    other_prefix = await S3Store.open(base.model_copy(update={"prefix": f"clients/{unique}-2/"}))
    unsigned = await S3Store.open(base, sign_payload=False)
    slower = await S3Store.open(base.model_copy(update={"read_timeout": 31.0}))
    try:
        assert one._client is other_prefix._client  # the prefix is the store's, per request
        assert unsigned._client is not one._client  # signing is the client's
        assert slower._client is not one._client
        assert s3_clients.open_clients() == before + 3
        assert one._fast is not None and one._fast._store is other_prefix._fast._store  # type: ignore[union-attr]

        await one.put("k", b"one")
        await other_prefix.put("k", b"two")
        assert await one.get("k") == b"one" and await other_prefix.get("k") == b"two"

        await one.aclose()  # the client stays open for the store still using it
        await other_prefix.put("k2", b"still")
        assert await other_prefix.get("k2") == b"still"
        with pytest.raises(NotFound):
            await other_prefix.stat("absent")  # through botocore (HEAD without obstore: stat)
    finally:
        for store in (other_prefix, unsigned, slower):
            await store.aclose()
    assert s3_clients.open_clients() == before  # the last user closed each


@pytest.mark.asyncio(loop_scope="session")
async def test_stores_opened_at_once_share_the_client_built_once(
    cfg_a: AgentConfig, unique: str
) -> None:
    cfg = cfg_a.vault.model_copy(update={"prefix": f"clients/{unique}/", "max_concurrency": 7})
    stores = await asyncio.gather(*(S3Store.open(cfg) for _ in range(5)))
    try:
        assert len({id(s._client) for s in stores}) == 1
        await asyncio.gather(*(s.put(f"k{i}", b"x") for i, s in enumerate(stores)))
    finally:
        for store in stores:
            await store.aclose()


def test_obstore_client_per_configuration(cfg_a: AgentConfig) -> None:
    cfg = cfg_a.vault
    a, b = s3_obstore.FastS3.open(cfg), s3_obstore.FastS3.open(cfg)
    other = s3_obstore.FastS3.open(cfg.model_copy(update={"bucket": "another"}))
    assert a is not None and b is not None and other is not None
    assert a._store is b._store and other._store is not a._store


def test_one_tls_context_per_bundle(tmp_path: Path) -> None:
    system = SharedTLSSession(verify=True)._build_verify_context()
    assert SharedTLSSession(verify=True)._build_verify_context() is system
    assert system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname

    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(Path(get_cert_path(True)).read_bytes())  # botocore's own bundle
    own = SharedTLSSession(verify=str(bundle))._build_verify_context()
    assert own is not system and own.get_ca_certs()  # the bundle's CAs, loaded
    assert SharedTLSSession(verify=str(bundle))._build_verify_context() is own
    changed = tmp_path / "ca.new"
    changed.write_bytes(bundle.read_bytes() + b"\n")
    changed.replace(bundle)  # a changed bundle is loaded again
    assert SharedTLSSession(verify=str(bundle))._build_verify_context() is not own

    unverified = SharedTLSSession(verify=False)._build_verify_context()
    assert unverified.verify_mode == ssl.CERT_NONE and unverified is not system

    # a client certificate is loaded into the context: never into the shared one
    with_cert = SharedTLSSession(verify=True, client_cert=str(tmp_path / "client.pem"))
    assert with_cert._build_verify_context() is not system
