"""S3 event notifications received on a webhook the source serves (MinIO's webhook
target, or any relay of AWS S3 notifications): ``POST /events`` with the S3 event
JSON (``{"Records": [...]}``), optionally with ``Authorization: Bearer TOKEN``.

The same interface as ``FilerTail``: ``start``, ``poll`` (hints received so far),
``lost_events`` and ``stop``. A notification is only a hint: the capture
reads the key's current state, so duplicates and reordering are harmless, and
the scan catches what was never delivered. For the same reason its silence
proves nothing (``drained_at`` is always None): the sender is not observed, so
an idle webhook stream's RPO rests on the scan.
"""

from __future__ import annotations

import hmac
import json
import ssl
import time

from aiohttp import web

from replicators.objects.events import Hint, s3_event_hints
from replicators.objects.options import WebhookEvents


class S3Webhook:
    def __init__(self, cfg: WebhookEvents, bucket: str, prefix: str) -> None:
        self.cfg = cfg
        self.bucket = bucket
        self.prefix = prefix
        self._pending: list[Hint] = []
        self._runner: web.AppRunner | None = None
        self.received = 0
        self.since: float | None = None
        self.drained_at: float | None = None
        self._overflowed = False

    async def start(self) -> None:
        """Serve ``POST /events`` on ``cfg.listen`` (a no-op if serving)."""
        if self._runner is not None:
            return
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post("/events", self._receive)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = self.cfg.listen.rpartition(":")
        tls = None
        if self.cfg.tls_cert is not None and self.cfg.tls_key is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self.cfg.tls_cert, self.cfg.tls_key)
        await web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=tls).start()
        self._runner = runner

    async def _receive(self, request: web.Request) -> web.Response:
        if self.cfg.token is not None:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {self.cfg.token.reveal()}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return web.Response(status=401, text="bad or missing bearer token\n")
        try:
            message = json.loads(await request.read())
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            return web.Response(status=400, text="expected an S3 event notification (JSON)\n")
        if not isinstance(message, dict):
            return web.Response(status=400, text="expected a JSON object\n")
        try:
            hints = s3_event_hints(message)
        except ValueError as exc:  # refused whole: the sender sees why and may send it again
            return web.Response(status=400, text=f"not an S3 event notification: {exc}\n")
        now = time.time()
        for hint in hints:
            if hint.bucket != self.bucket or not hint.key.startswith(self.prefix):
                continue
            if len(self._pending) >= self.cfg.max_pending:
                self._overflowed = True  # dropped: the source scans instead
                continue
            when = min(now, max(hint.time, now - self.cfg.max_event_age))
            key = hint.key[len(self.prefix) :]
            self._pending.append(Hint(hint.bucket, key, when, hint.deleted))
            self.received += 1
        return web.Response(status=204)

    async def poll(self) -> list[Hint]:
        hints, self._pending = self._pending, []
        return hints

    def lost_events(self) -> bool:
        """True once after hints were dropped for a full queue (the source then scans)."""
        lost, self._overflowed = self._overflowed, False
        return lost

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
