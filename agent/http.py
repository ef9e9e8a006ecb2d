"""The agent's HTTP endpoint (aiohttp): /metrics, /healthz, /readyz, /status.

``/metrics`` and ``/healthz`` are open (Prometheus and probes); everything
else needs ``Authorization: Bearer <token>`` when a token is configured. TLS
is on when a certificate is configured, and client certificates are required
when a client CA is configured.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.config import HttpConfig

OPEN_PATHS = frozenset({"/metrics", "/healthz"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StatusSource:
    """What the endpoint reads from the agent; the daemon implements it."""

    def status(self) -> dict[str, Any]:
        raise NotImplementedError

    def healthy(self) -> tuple[bool, str]:
        raise NotImplementedError

    def ready(self) -> tuple[bool, str]:
        raise NotImplementedError


def _auth_middleware(token: str | None) -> Any:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is None or request.path in OPEN_PATHS:
            return await handler(request)
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return web.json_response(
                {"error": "unauthorized"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="dragent"'},
            )
        return await handler(request)

    return auth


def build_app(
    source: StatusSource, registry: CollectorRegistry, token: str | None
) -> web.Application:
    app = web.Application(middlewares=[_auth_middleware(token)])

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        ok, why = source.healthy()
        return web.json_response({"ok": ok, "reason": why}, status=200 if ok else 503)

    async def readyz(_: web.Request) -> web.Response:
        ok, why = source.ready()
        return web.json_response({"ready": ok, "reason": why}, status=200 if ok else 503)

    async def status(_: web.Request) -> web.Response:
        return web.json_response(source.status())

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    return app


def ssl_context(cfg: HttpConfig) -> ssl.SSLContext | None:
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_client_ca is not None:
        ctx.load_verify_locations(cfg.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class HttpServer:
    """Serves ``build_app`` on ``cfg.listen``; ``start`` then ``aclose``."""

    def __init__(self, cfg: HttpConfig, app: web.Application) -> None:
        self.cfg = cfg
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self) -> None:
        host, _, port = self.cfg.listen.rpartition(":")
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, host.strip("[]"), int(port), ssl_context=ssl_context(self.cfg)
        )
        await site.start()

    async def aclose(self) -> None:
        await self._runner.cleanup()
