"""The agent's HTTP endpoint (aiohttp): /metrics, /healthz, /readyz, /status, the status
page and the verification API.

``/metrics`` and ``/healthz`` are open (Prometheus and probes), and so is the
status page ``/`` (it holds no data: its script polls ``/status`` with the
token from the URL fragment); everything else needs ``Authorization: Bearer
<token>`` when a token is configured. TLS is on when a certificate is
configured, and client certificates are required when a client CA is
configured.

API (when the app is given a ``VerifyJobs``):

- ``POST /api/v1/verify/{stream}`` (``?deep=1``) queues a verification and
  answers 202 ``{"id", "state", "report_url"}``; 404 for an unknown stream,
  501 if its kind has no verification, 429 when too many are queued.
- ``GET /api/v1/reports/{id}``: 202 with the job while it runs; 200 with the
  signed report when done (JSON, or HTML when the ``Accept`` header prefers
  ``text/html``, Markdown for ``text/markdown``); 500 with the error if the
  verification could not run; 404 for an unknown id.
- ``GET /api/v1/reports``: every kept job, newest first.

Mirror key trees, read-only (objects streams; the tree of this region's target, which
the active region's verify compares with its source's; see ``verifiers.remote_tree``):

- ``GET /api/v1/trees/{stream}``: depth, partitions, built_at, built_from, updated_at,
  keys, root and partition_roots (hex); 404 if this agent keeps no such tree.
- ``GET /api/v1/trees/{stream}/nodes?level=L&index=I,J,...``: up to 512 nodes of one
  level (hex, null for an empty subtree); 400 for a bad level or index.
- ``GET /api/v1/trees/{stream}/bucket/{n}``: the keys of hash bucket ``n`` and their
  leaves (hex).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent.config import AgentConfig, HttpConfig
from agent.statuspage import PAGE, RpoHistory, local_alerts, peer_summary
from agent.verifyjobs import Job, VerifyJobs, VerifyUnavailable
from replicators.objects.held import COLLECTOR as OBJECTS_HELD
from replicators.objects.trees import MIRROR_TREE, TreeStore
from replicators.partitions import partitions
from replicators.paths import StreamPaths
from verifiers.report import to_html, to_markdown

OPEN_PATHS = frozenset({"/metrics", "/healthz", "/"})
SAMPLE_EVERY = 1.0
DRILLS = ("restore", "failover")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StatusSource:
    """What the endpoint reads from the agent; the daemon implements it."""

    def status(self) -> dict[str, Any]:
        raise NotImplementedError

    def healthy(self) -> tuple[bool, str]:
        raise NotImplementedError

    def ready(self) -> tuple[bool, str]:
        raise NotImplementedError


def _auth_middleware(token_of: Callable[[], str | None]) -> Any:
    """Bearer-token check; the token is read at every request (a reload may change it)."""

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = token_of()
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
    source: StatusSource,
    registry: CollectorRegistry,
    token: str | Callable[[], str | None] | None,
    jobs: VerifyJobs | None = None,
) -> web.Application:
    """The endpoint's application. With ``jobs``, the verification API is served,
    ``jobs.collector`` is registered on ``registry`` and ``jobs.serve()`` runs for the
    life of the app, as does the RPO history sampler."""
    token_of = token if callable(token) else (lambda: token)
    app = web.Application(middlewares=[_auth_middleware(token_of)])
    live = Live()

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
        body = source.status()
        verifications = (
            {k: j.summary() for k, j in jobs.latest().items()} if jobs is not None else {}
        )
        body.setdefault("verifications", verifications)
        body.setdefault("drills", dict(live.drills))
        body.setdefault("peers", list(live.peers.values()))
        body.setdefault("rpo_history", live.history.series())
        body.setdefault("alerts", local_alerts(body, verifications))
        return web.json_response(body)

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html", charset="utf-8")

    async def background(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_background(source, registry, live, jobs))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(background)
    app.router.add_get("/", page)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    with contextlib.suppress(ValueError):  # once per registry: the objects held-deletes gauge
        registry.register(OBJECTS_HELD)
    if jobs is not None:
        registry.register(jobs.collector)
        _add_api(app, jobs)
    return app


@dataclass
class Live:
    """What the endpoint samples in the background for /status and the page."""

    history: RpoHistory = field(default_factory=RpoHistory)
    drills: dict[str, float] = field(default_factory=dict)
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)


async def _background(
    source: StatusSource, registry: CollectorRegistry, live: Live, jobs: VerifyJobs | None
) -> None:
    """The app's own tasks, owned by one TaskGroup: the sampler and the verify jobs."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_sample(source, registry, live, jobs))
        if jobs is not None:
            tg.create_task(jobs.serve())


async def _sample(
    source: StatusSource, registry: CollectorRegistry, live: Live, jobs: VerifyJobs | None
) -> None:
    """Every second one RPO/lag sample per stream; every ten the drill times; every
    five the peers' roles (from their open /metrics)."""
    tick = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while True:
            try:
                live.history.add(time.time(), source.status())
                if tick % 10 == 0:
                    live.drills.update(_drill_times(registry))
            except Exception:  # a status that fails now must not end the sampling for good
                pass
            if tick % 5 == 0 and jobs is not None:
                await _poll_peers(http, jobs.config(), live)
            tick += 1
            await asyncio.sleep(SAMPLE_EVERY)


async def _poll_peers(http: aiohttp.ClientSession, cfg: AgentConfig, live: Live) -> None:
    """Each peer's role and epoch, read from its /metrics; unreachable ones say so."""
    for peer in cfg.peers:
        if not peer.agent_url:
            continue
        row: dict[str, Any] = {
            "region": peer.name,
            "url": peer.agent_url,
            "checked_at": time.time(),
        }
        try:
            async with http.get(peer.agent_url.rstrip("/") + "/metrics") as resp:
                resp.raise_for_status()
                row.update(peer_summary(await resp.text()), reachable=True)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            row.update(reachable=False, error=type(exc).__name__)
        live.peers[peer.name] = row
    for gone in set(live.peers) - {p.name for p in cfg.peers}:
        del live.peers[gone]


def _drill_times(registry: CollectorRegistry) -> dict[str, float]:
    out = {}
    for drill in DRILLS:
        value = registry.get_sample_value(
            "dragent_drill_last_success_timestamp_seconds", {"drill": drill}
        )
        if value:
            out[drill] = value
    return out


def _add_api(app: web.Application, jobs: VerifyJobs) -> None:
    async def start_verify(request: web.Request) -> web.Response:
        deep = request.query.get("deep", "") in ("1", "true", "yes")
        try:
            job = jobs.submit(request.match_info["stream"], deep=deep)
        except VerifyUnavailable as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        return web.json_response(
            {"id": job.id, "state": job.state, "report_url": f"/api/v1/reports/{job.id}"},
            status=202,
        )

    async def report(request: web.Request) -> web.Response:
        job = jobs.get(request.match_info["id"])
        if job is None:
            return web.json_response({"error": "no such report"}, status=404)
        return _report_response(job, request.headers.get("Accept", ""))

    async def reports(_: web.Request) -> web.Response:
        return web.json_response({"reports": [j.summary() for j in jobs.jobs()]})

    app.router.add_post("/api/v1/verify/{stream}", start_verify)
    app.router.add_get("/api/v1/reports", reports)
    app.router.add_get("/api/v1/reports/{id}", report)
    _add_trees(app, jobs.config)


MAX_TREE_NODES = 512


class _BadRequest(ValueError):
    pass


def _add_trees(app: web.Application, config: Callable[[], AgentConfig]) -> None:
    """The read-only mirror key tree routes (see the module docstring)."""

    def tree_path(stream: str) -> Path | None:
        cfg = config()
        names = {
            p.name
            for s in cfg.streams
            if s.kind == "objects"
            for p in partitions(s.name, s.partitions)
        }
        if stream not in names:
            return None
        path = StreamPaths(cfg.data_dir, stream).target / MIRROR_TREE
        return path if path.exists() else None

    async def serve(request: web.Request, read: Callable[[TreeStore], Any]) -> web.Response:
        stream = request.match_info["stream"]
        path = tree_path(stream)
        if path is None:
            return web.json_response(
                {"error": f"no mirror key tree of {stream!r} here"}, status=404
            )

        def run() -> Any:
            tree = TreeStore(path)
            try:
                return read(tree)
            finally:
                tree.close()

        try:
            body = await asyncio.to_thread(run)
        except _BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except (ValueError, OSError, sqlite3.Error) as exc:
            return web.json_response({"error": f"tree unreadable: {exc}"}, status=503)
        return web.json_response({"stream": stream, **body})

    def whole(tree: TreeStore) -> dict[str, Any]:
        roots = tree.partition_roots()
        info = tree.info()
        del info["path"]
        return {
            **info,
            "root": tree.root().hex(),
            "partition_roots": {str(p): r.hex() for p, r in sorted(roots.items())},
        }

    async def summary(request: web.Request) -> web.Response:
        return await serve(request, whole)

    async def nodes(request: web.Request) -> web.Response:
        try:
            level = int(request.query.get("level", ""))
            indices = [int(i) for v in request.query.getall("index", []) for i in v.split(",") if i]
        except ValueError:
            return web.json_response({"error": "level and index are integers"}, status=400)
        if len(indices) > MAX_TREE_NODES:
            return web.json_response({"error": f"at most {MAX_TREE_NODES} nodes"}, status=400)

        def read(tree: TreeStore) -> dict[str, Any]:
            if not 0 <= level <= tree.depth or any(not 0 <= i < 1 << level for i in indices):
                raise _BadRequest(f"level is 0..{tree.depth}, index 0..2**level-1")
            found = {i: tree.node_at(level, i) for i in indices}
            return {
                "level": level,
                "nodes": {str(i): n.hex() if n is not None else None for i, n in found.items()},
            }

        return await serve(request, read)

    async def bucket(request: web.Request) -> web.Response:
        try:
            n = int(request.match_info["n"])
        except ValueError:
            return web.json_response({"error": "a bucket is an integer"}, status=400)

        def read(tree: TreeStore) -> dict[str, Any]:
            if not 0 <= n < 1 << tree.depth:
                raise _BadRequest(f"a bucket is 0..{(1 << tree.depth) - 1}")
            return {"bucket": n, "keys": {k: v.hex() for k, v in tree.leaves(n).items()}}

        return await serve(request, read)

    app.router.add_get("/api/v1/trees/{stream}", summary)
    app.router.add_get("/api/v1/trees/{stream}/nodes", nodes)
    app.router.add_get("/api/v1/trees/{stream}/bucket/{n}", bucket)


def _report_response(job: Job, accept: str) -> web.Response:
    if job.state == "failed":
        return web.json_response(job.summary(), status=500)
    if job.report is None:
        return web.json_response(job.summary(), status=202)
    wanted = preferred_type(accept)
    if wanted == "text/html":
        return web.Response(text=to_html(job.report), content_type="text/html", charset="utf-8")
    if wanted == "text/markdown":
        return web.Response(
            text=to_markdown(job.report), content_type="text/markdown", charset="utf-8"
        )
    return web.json_response(job.report)


def preferred_type(accept: str) -> str:
    """``text/html``, ``text/markdown`` or ``application/json`` from an Accept header:
    the offered type with the highest q, the earliest on a tie; JSON by default."""
    best, best_q = "application/json", 0.0
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        if media in ("text/html", "text/markdown", "application/json") and q > best_q:
            best, best_q = media, q
    return best


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
