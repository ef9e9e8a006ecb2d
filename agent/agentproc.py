"""An agent running as a child process (``python -m agent run``): for the demo and tests.

The pid goes to a pid file so ``dragent lab fault REGION agent ...`` can act on it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp


class AgentProcess:
    def __init__(
        self, config: Path, log_path: Path, pid_path: Path, url: str, args: list[str] | None = None
    ) -> None:
        """``args``: more words for ``dragent run`` (``--instance``, ``--listen``)."""
        self.config = config
        self.args = list(args or [])
        self.log_path = log_path
        self.pid_path = pid_path
        self.url = url.rstrip("/")
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, env: dict[str, str] | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115, ASYNC230 - handed to the child
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent",
                "run",
                "--config",
                str(self.config),
                *self.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, **(env or {})},
            )
        finally:
            log.close()
        self.pid_path.write_text(f"{self.proc.pid}\n")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def status(self) -> dict[str, Any] | None:
        """The agent's /status, or None while it does not answer."""
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                session.get(f"{self.url}/status") as resp,
            ):
                return await resp.json() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def wait_ready(self, within: float = 30.0) -> None:
        """Wait until /readyz says ready; raises RuntimeError with the log tail if not."""
        async with asyncio.timeout(within):
            while True:
                if not self.running:
                    raise RuntimeError(f"agent exited early; log {self.log_path}:\n{self.tail()}")
                try:
                    async with (
                        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s,
                        s.get(f"{self.url}/readyz") as resp,
                    ):
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM and wait for the drain; SIGKILL if it overruns. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.pid_path.unlink(missing_ok=True)
        return self.proc.returncode

    async def kill(self) -> None:
        """kill -9: no drain, no cleanup."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.pid_path.unlink(missing_ok=True)
