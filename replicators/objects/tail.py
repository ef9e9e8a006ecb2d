"""SeaweedFS filer metadata subscription: ``weed filer.meta.tail`` as a child process.

Sources subscribe through ``FilerSubscription``: the sources of one bucket and prefix
in a process (the partitions a member owns) share one child (``SharedFilerTail``).

The filer pushes every metadata change under the bucket's path over gRPC;
``weed filer.meta.tail`` prints each as a JSON object. ``poll()`` returns
the hints read so far without waiting. If the child dies, events may have
been lost: ``lost_events()`` says so once (the source then starts a scan)
and the child is started again on the next ``poll()``.

``since`` is when the running subscription started (None: none runs), and
``drained_at`` a wall time before which every event it printed has been
returned by ``poll()``: when ``poll()`` last found the pending read waiting,
if it finds it still waiting (nothing printed since). It counts the filer's
push as immediate.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import time
import weakref

from replicators import logs
from replicators.objects.events import Hint, JsonStream, event_time, filer_hints
from replicators.objects.options import FilerEvents

log = logs.get("objects")
READ = 1 << 16
REPLAY = 10.0


def _with_death_signal(argv: list[str]) -> list[str]:
    """``argv`` run so that it gets SIGKILL when the agent dies (even by kill -9), so no
    orphan is left: through util-linux's ``setpriv --pdeathsig`` where there is one. Not
    by a ``preexec_fn``: Python code between fork and exec deadlocks when another thread
    (etcd's gRPC client in an agent of a group) held a lock at the fork, and the agent's
    event loop then waits for the child for ever."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


class FilerTail:
    def __init__(self, cfg: FilerEvents, bucket: str, prefix: str) -> None:
        self.cfg = cfg
        self.bucket = bucket
        self.prefix = prefix
        self.path = f"{cfg.buckets_dir.rstrip('/')}/{bucket}/{prefix}"
        self._proc: asyncio.subprocess.Process | None = None
        self._json = JsonStream()
        self._lost = False
        self._restart = False
        self._last_event = 0.0
        self._pending: list[Hint] = []
        self._reader: asyncio.Task[bytes] | None = None
        self._waiting_since: float | None = None
        self._seen_waiting: asyncio.Task[bytes] | None = None
        self._seen_waiting_at = 0.0
        self.since: float | None = None
        self.drained_at: float | None = None

    async def start(self) -> None:
        """Start the subscription (a no-op if it runs)."""
        if self._proc is not None and self._proc.returncode is None:
            return
        self.since, self.drained_at = time.time(), None
        argv = [
            self.cfg.weed,
            "filer.meta.tail",
            f"-filer={self.cfg.filer}",
            f"-pathPrefix={self.path}",
            f"-timeAgo={self._replay_ms()}ms",
        ]
        self._proc = await asyncio.create_subprocess_exec(
            *_with_death_signal(argv),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL,
        )
        self._json = JsonStream()
        self._restart = False

    def _replay_ms(self) -> int:
        """Replay from a little before the last event seen (or ``REPLAY`` seconds on a first
        start): the subscription connects asynchronously, and a duplicate hint is harmless."""
        since = self._last_event - 1.0 if self._last_event else time.time() - REPLAY
        return max(1, int((time.time() - since) * 1000))

    async def poll(self) -> list[Hint]:
        """Hints received since the last call (waits only to restart a dead subscription)."""
        out: list[Hint] = []
        if self._proc is None and self._restart:
            await self.start()
        proc = self._proc
        if proc is None or proc.stdout is None:
            return out
        reader = proc.stdout
        while True:
            if self._reader is None:
                self._waiting_since = None
                self._reader = asyncio.ensure_future(self._read(reader))
            if not self._reader.done():
                now = time.time()
                if self._seen_waiting is self._reader and self._waiting_since is not None:
                    self.drained_at = max(self._waiting_since, self._seen_waiting_at)
                self._seen_waiting, self._seen_waiting_at = self._reader, now
                break
            data = self._reader.result()
            self._reader = None
            if not data:
                self._died()
                break
            for event in self._json.feed(data):
                try:
                    hints = filer_hints(event, self.cfg.buckets_dir)
                except ValueError as exc:  # a malformed event: its change is found by a scan
                    log.warning("malformed filer event skipped; starting a scan", error=str(exc))
                    self._lost = True
                    continue
                self._last_event = max(self._last_event, event_time(event))
                out += [h for h in hints if h.bucket == self.bucket]
            if self._json.dropped:
                log.warning("unreadable filer output skipped; starting a scan")
                self._json.dropped, self._lost = 0, True
        if self.prefix:
            cut = len(self.prefix)
            out = [
                Hint(h.bucket, h.key[cut:], h.time, h.deleted)
                for h in out
                if h.key.startswith(self.prefix)
            ]
        return out

    async def _read(self, reader: asyncio.StreamReader) -> bytes:
        self._waiting_since = time.time()  # everything printed before was read already
        return await reader.read(READ)

    def _died(self) -> None:
        log.warning("the filer subscription ended; starting a scan and subscribing again")
        self._lost = self._restart = True
        self._proc = None
        self.since = self.drained_at = None

    def lost_events(self) -> bool:
        """True once after the subscription ended or printed an event that could not be
        read (events may have been missed)."""
        lost, self._lost = self._lost, False
        return lost

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        proc, self._proc = self._proc, None
        self.since = self.drained_at = None
        if proc is not None and proc.returncode is None:
            proc.kill()
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()


# -- one subscription per bucket and prefix, shared ---------------------------------------

MAX_PENDING = 100_000
"""Hints a subscriber may hold not yet polled; past it they are dropped and the subscriber
told that events were lost (its source scans instead)."""


class SharedFilerTail:
    """One ``weed filer.meta.tail`` child for every source of a bucket (and prefix) in
    this event loop: a member's partitions each need every event (they keep their own
    keys), and each child costs about 100 MB of memory and parses every event. Whichever
    subscriber polls reads the child's output for all of them."""

    def __init__(self, cfg: FilerEvents, bucket: str, prefix: str) -> None:
        self.tail = FilerTail(cfg, bucket, prefix)
        self.subscribers: set[FilerSubscription] = set()

    async def poll(self) -> None:
        hints = await self.tail.poll()
        lost = self.tail.lost_events()
        for sub in self.subscribers:
            sub.take(hints, lost)

    async def leave(self, sub: FilerSubscription) -> None:
        self.subscribers.discard(sub)
        if not self.subscribers:
            tail = self.tail  # the next subscriber starts afresh (no replay of the gap)
            self.tail = FilerTail(tail.cfg, tail.bucket, tail.prefix)
            await tail.stop()


class FilerSubscription:
    """A source's view of its bucket's ``SharedFilerTail``, with ``FilerTail``'s interface.

    ``since`` is the later of the child's start and this subscriber's (events printed
    before it subscribed were not all kept for it); ``drained_at`` is the child's, as
    of this subscriber's last ``poll()``: every event read before it has been returned
    to this subscriber then."""

    def __init__(self, cfg: FilerEvents, bucket: str, prefix: str) -> None:
        self._key = (cfg, bucket, prefix)
        self._shared: SharedFilerTail | None = None
        self._pending: list[Hint] = []
        self._lost = False
        self._joined: float | None = None
        self.drained_at: float | None = None

    @property
    def shared(self) -> SharedFilerTail:
        """This loop's subscription of the bucket and prefix (set up at the first use)."""
        if self._shared is None:
            hubs = _SHARED.setdefault(asyncio.get_running_loop(), {})
            if self._key not in hubs:
                hubs[self._key] = SharedFilerTail(*self._key)
            self._shared = hubs[self._key]
        return self._shared

    @property
    def since(self) -> float | None:
        if self._joined is None or (started := self.shared.tail.since) is None:
            return None
        return max(started, self._joined)

    async def start(self) -> None:
        if self._joined is None:
            self._joined, self.drained_at = time.time(), None
            self.shared.subscribers.add(self)
        await self.shared.tail.start()

    def take(self, hints: list[Hint], lost: bool) -> None:
        """The child's output read by any subscriber's poll (``SharedFilerTail.poll``)."""
        if lost:
            self._lost, self.drained_at = True, None
        if len(self._pending) + len(hints) > MAX_PENDING:
            log.warning("filer events not polled in time dropped; starting a scan")
            self._pending, self._lost, self.drained_at = [], True, None
            return
        self._pending += hints

    async def poll(self) -> list[Hint]:
        if self._joined is None:
            return []
        await self.shared.poll()
        out, self._pending = self._pending, []
        self.drained_at = self.shared.tail.drained_at
        return out

    def lost_events(self) -> bool:
        lost, self._lost = self._lost, False
        return lost

    async def stop(self) -> None:
        if self._joined is None:
            return
        self._joined, self.drained_at, self._pending = None, None, []
        await self.shared.leave(self)


_SHARED: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[FilerEvents, str, str], SharedFilerTail]
] = weakref.WeakKeyDictionary()
