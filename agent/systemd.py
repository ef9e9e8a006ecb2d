"""systemd service notification (sd_notify): READY, STATUS, WATCHDOG, STOPPING.

Does nothing when ``NOTIFY_SOCKET`` is unset, so the agent runs the same
under systemd, in a container or by hand.
"""

from __future__ import annotations

import os

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n = sdnotify.SystemdNotifier() if self.enabled else None

    def _send(self, message: str) -> None:
        if self._n is not None:
            self._n.notify(message)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def reloading(self) -> None:
        self._send("RELOADING=1")

    def watchdog_interval(self) -> float | None:
        """Half the watchdog timeout systemd set, in seconds, or None when it set none."""
        usec = os.environ.get("WATCHDOG_USEC")
        if not self.enabled or not usec or not usec.isdigit():
            return None
        return int(usec) / 2e6
