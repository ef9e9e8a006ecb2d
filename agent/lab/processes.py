"""Detached lab servers, found again through pid files and /proc.

A lab server outlives the command that started it (``dragent lab up`` returns,
the servers keep running), so everything here works from a pid file and
``/proc``, never from a child-process handle. A pid file is believed only if
``/proc/<pid>/cmdline`` contains the server's *marker* (its data directory): a
stale file whose pid now belongs to another program is ignored, never
signalled.

``Server`` is the shape every kind of lab server shares (``postgres.py``,
``seaweed.py``, ``etcd.py``): ``start()``, ``wait_ready()``, ``stop()``,
``kill()``, ``pause()``, ``resume()``, ``is_running()``. Signals that model a
crash or a hang (SIGKILL, SIGSTOP, SIGCONT) go to the whole process tree, so a
paused PostgreSQL has no backend left answering either. A server's ``place``
(``agent.lab.network``) is the address it listens on and the network namespace
it is started in (``place.wrap(argv)``); the pid is the server's own either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from agent.lab.network import LOOPBACK, Place
from replicators.errors import DragentError


class LabError(DragentError):
    """The lab could not do what was asked. The message names the server and its log."""


def spawn(
    argv: Sequence[str], *, log: Path, pid_file: Path, env: Mapping[str, str] | None = None
) -> int:
    """Start ``argv`` in a new session, detached from ours; return its pid.

    stdin is /dev/null, stdout and stderr are appended to ``log``, and the pid
    is written to ``pid_file``. Nothing waits for the process: it keeps running
    after this program exits. Raises ``LabError`` if the program cannot be run.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    # Python ignores SIGPIPE and SIGXFSZ; a server must get the defaults back.
    defaults = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    try:
        pid = os.posix_spawn(
            argv[0],
            list(argv),
            dict(os.environ if env is None else env),
            file_actions=actions,
            setsid=True,
            setsigdef=defaults,
        )
    except OSError as exc:
        raise LabError(f"cannot run {argv[0]}: {exc.strerror}") from None
    tmp = pid_file.with_name(pid_file.name + ".tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(pid_file)
    return pid


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return raw.rpartition(")")[2].split()


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is a finished child of ours, so it does not stay a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def alive(pid: int) -> bool:
    """True if ``pid`` exists and has not finished exiting. A zombie counts as gone
    once its last thread is: a multi-threaded server's main thread turns zombie
    while other threads still hold its sockets."""
    fields = _stat(pid)
    if fields is None:
        return False
    if fields[0] not in ("Z", "X"):
        return True
    _reap(pid)
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def is_stopped(pid: int) -> bool:
    """True if ``pid`` is suspended by SIGSTOP."""
    fields = _stat(pid)
    return fields is not None and fields[0] == "T"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def read_pid(pid_file: Path, marker: str) -> int | None:
    """The pid in the first line of ``pid_file`` if that process lives and is ours."""
    try:
        first = pid_file.read_text().partition("\n")[0].strip()
    except OSError:
        return None
    if not first.isdigit():
        return None
    pid = int(first)
    return pid if alive(pid) and marker in cmdline(pid) else None


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, parents before children."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


async def poll(check: Callable[[], Awaitable[bool]], interval: float = 0.1) -> None:
    """Await ``check()`` every ``interval`` s until it is true. No deadline: scope it
    with ``asyncio.timeout``. (Another program's process or port gives no event.)"""
    while True:
        if await check():
            return
        await asyncio.sleep(interval)


async def wait_gone(pids: Sequence[int]) -> None:
    """Wait until every pid has exited (no deadline: scope it with ``asyncio.timeout``)."""

    async def gone() -> bool:
        return not any(alive(p) for p in pids)

    await poll(gone, 0.05)


async def run_all(coros: Iterable[Awaitable[None]]) -> None:
    """Run concurrently and let every one finish (a failure cancels no sibling), then
    raise one ``LabError`` naming every failure."""
    errors: list[LabError] = []

    async def run(coro: Awaitable[None]) -> None:
        try:
            await coro
        except LabError as exc:
            errors.append(exc)

    async with asyncio.TaskGroup() as tg:
        for coro in coros:
            tg.create_task(run(coro))
    if errors:
        raise LabError("\n".join(str(e) for e in errors))


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file, indented, for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"    (cannot read {path}: {exc.strerror})"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


class Server:
    """One detached lab server, identified by its pid file and cmdline marker.

    Subclasses set ``kind`` and implement ``start()`` (idempotent: nothing to
    do when running) and ``probe()`` (one readiness check, bounded in time).
    """

    kind: ClassVar[str] = "server"
    stop_signal: ClassVar[int] = signal.SIGTERM
    stop_timeout: ClassVar[float] = 10.0
    ready_timeout: ClassVar[float] = 20.0
    # How long a freshly started server may have no live pid (PostgreSQL writes
    # postmaster.pid a moment after pg_ctl returns).
    start_grace: ClassVar[float] = 3.0

    def __init__(
        self,
        where: str,
        *,
        pid_file: Path,
        log_file: Path,
        marker: str,
        ports: Sequence[int],
        place: Place = LOOPBACK,
    ) -> None:
        self.where = where
        self.pid_file = pid_file
        self.log_file = log_file
        self.marker = marker
        self.ports = tuple(ports)
        self.place = place

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return self.place.address

    @property
    def name(self) -> str:
        return f"{self.kind} for region {self.where}"

    @property
    def endpoint(self) -> str:
        """Where clients reach the server (a URL or DSN)."""
        return f"{self.host}:{self.ports[0]}"

    @property
    def pid(self) -> int | None:
        return read_pid(self.pid_file, self.marker)

    def is_running(self) -> bool:
        return self.pid is not None

    def is_paused(self) -> bool:
        pid = self.pid
        return pid is not None and is_stopped(pid)

    async def start(self) -> None:
        raise NotImplementedError

    async def probe(self) -> bool:
        raise NotImplementedError

    async def wait_ready(self) -> None:
        """Wait until ``probe()`` passes. Raises ``LabError`` with the log's tail if
        the server exits first or is not ready within ``ready_timeout`` seconds."""
        start = time.monotonic()
        try:
            async with asyncio.timeout(self.ready_timeout):
                while not await self.probe():
                    gone = time.monotonic() - start > self.start_grace and not self.is_running()
                    if gone:
                        raise self.failure("exited before it became ready")
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise self.failure(f"did not become ready within {self.ready_timeout:g}s") from None

    def failure(self, what: str) -> LabError:
        return LabError(f"{self.name} {what}; see {self.log_file}:\n{log_tail(self.log_file)}")

    async def stop(self) -> None:
        """Stop gracefully (``stop_signal``), then SIGKILL after ``stop_timeout``.

        A paused server is resumed so it can act on the signal. No-op if not running.
        """
        pid = self.pid
        if pid is None:
            return
        signal_all([pid], self.stop_signal)
        signal_all([pid, *descendants(pid)], signal.SIGCONT)
        try:
            async with asyncio.timeout(self.stop_timeout):
                await wait_gone([pid])
        except TimeoutError:
            await self.kill()

    async def kill(self) -> None:
        """SIGKILL the server and all its processes, like a crash; wait until gone."""
        pid = self.pid
        if pid is None:
            return
        tree = [pid, *descendants(pid)]
        signal_all(tree, signal.SIGKILL)
        try:
            async with asyncio.timeout(10.0):
                await wait_gone(tree)
        except TimeoutError:
            raise LabError(f"{self.name} (pid {pid}) survived SIGKILL for 10s") from None

    def pause(self) -> None:
        """Suspend every process of the server (SIGSTOP): it hangs without dying."""
        pid = self.pid
        if pid is None:
            raise LabError(f"{self.name} is not running: nothing to pause")
        signal_all([pid, *descendants(pid)], signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause()``. No-op if the server is not running or not paused."""
        pid = self.pid
        if pid is not None:
            signal_all([pid, *descendants(pid)], signal.SIGCONT)
