"""Hooks for switches without a provider here (a load balancer, a service mesh).

``ExecHook`` runs a program (``{region}`` and ``{epoch}`` substituted in its
arguments); ``WebhookHook`` POSTs ``{"region": ..., "epoch": ...}`` as JSON. Both raise
``SwitchError`` on a non-zero exit / an HTTP status of 300 or more.
"""

from __future__ import annotations

import asyncio

import aiohttp

from agent.failover_config import ExecSwitch, WebhookSwitch
from agent.switch.base import SwitchError


class ExecHook:
    def __init__(self, cfg: ExecSwitch) -> None:
        self.cfg = cfg

    def describe(self) -> str:
        return f"exec {self.cfg.argv[0]}"

    async def point_to(self, region: str, epoch: int | None = None) -> None:
        shown = "" if epoch is None else str(epoch)
        argv = [a.replace("{region}", region).replace("{epoch}", shown) for a in self.cfg.argv]
        try:
            async with asyncio.timeout(self.cfg.timeout):
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
                )
                out, _ = await proc.communicate()
        except (OSError, TimeoutError) as exc:
            raise SwitchError(f"{self.describe()}: {type(exc).__name__}: {exc}") from None
        if proc.returncode:
            tail = out.decode(errors="replace")[-300:]
            raise SwitchError(f"{self.describe()} exited {proc.returncode}: {tail}")


class WebhookHook:
    def __init__(self, cfg: WebhookSwitch) -> None:
        self.cfg = cfg

    def describe(self) -> str:
        return "webhook"  # the URL may carry a token: never shown

    async def point_to(self, region: str, epoch: int | None = None) -> None:
        body = {"region": region, "epoch": epoch}
        try:
            async with (
                asyncio.timeout(self.cfg.timeout),
                aiohttp.ClientSession() as session,
                session.post(self.cfg.url.reveal(), json=body) as response,
            ):
                if response.status >= 300:
                    raise SwitchError(f"webhook switch answered HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SwitchError(f"webhook switch failed: {type(exc).__name__}") from None
