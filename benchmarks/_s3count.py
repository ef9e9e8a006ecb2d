"""A counting HTTPS front for the lab's SeaweedFS S3, for baselines that need TLS.

pgBackRest's S3 driver speaks only HTTPS and the lab's SeaweedFS only plain
HTTP, so the PostgreSQL benchmark puts this reverse proxy between them: it
terminates TLS with a throw-away self-signed certificate (pgBackRest runs with
``repo1-storage-verify-tls=n``), forwards every request unchanged (the Host
header too, so SigV4 signatures still verify) and counts the requests by S3
operation: what an object store would bill. It runs its own event loop in a
thread so it does not compete with the benchmark's loop.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import tempfile
import threading
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "trailer"}


def operation(method: str, path: str, query: dict[str, str]) -> str:
    """The S3 operation of a request, as billed: LIST, GET, HEAD, PUT, POST, DELETE."""
    parts = [p for p in path.split("/") if p]
    if method == "GET" and (len(parts) <= 1 or "list-type" in query):
        return "LIST"
    return method


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "proxy.crt", directory / "proxy.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


class CountingProxy:
    """``https://127.0.0.1:<port>`` in front of ``upstream``; ``counts`` by operation and
    ``bytes_in`` (request bodies) since the last ``reset``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.counts: Counter[str] = Counter()
        self.bytes_in = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="s3count-")

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._dir.cleanup()

    def reset(self) -> None:
        self.counts.clear()
        self.bytes_in = 0

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    async def _start(self) -> None:
        cert, key = _self_signed(Path(self._dir.name))
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        self.counts[operation(request.method, request.path, dict(request.query))] += 1
        self.bytes_in += len(body)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body if body else None,
            skip_auto_headers=("Content-Type", "User-Agent", "Accept", "Accept-Encoding"),
            allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in upstream.headers.items():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    response.headers[k] = v
            response.content_length = (
                int(upstream.headers.get("Content-Length", 0))
                if request.method == "HEAD"
                else len(payload)
            )
            await response.prepare(request)
            if request.method != "HEAD" and payload:
                await response.write(payload)
            await response.write_eof()
            return response
