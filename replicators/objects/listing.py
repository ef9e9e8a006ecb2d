"""One listing of a bucket shared by every scan of it in this process.

A partitioned stream's member runs one source per partition it owns, and each
source's scan needs the whole listing (it keeps its own keys): one listing
each would cost ``partitions × keys / 1000`` LISTs per scan. Instead, the
scans of one bucket (same endpoint, bucket and prefix) in an event loop
*subscribe* to one ``SharedListing``, which lists the bucket once for all of
them and hands each page to every subscriber:

- A scan that subscribes while a pass is under way starts at the next page and
  goes on to the end; then the listing starts again from the first key (a new
  pass, if some subscriber needs it) and the scan ends once it has been given
  the key range it missed. Pages are ranges ``(after, last key]``; together a
  scan's pages and the end of a pass cover every key once at least (a range
  given twice is harmless: comparing it again queues nothing new).
- A page carries when its LIST request began: a scan's proof (what changed
  before it is seen) is the earliest of its pages' times.
- Memory is bounded: each subscriber holds at most ``AHEAD`` pages (the same
  page objects for all); the listing waits for the slowest one, and drops one
  that took none for ``PATIENCE`` seconds (its scan fails and starts again,
  as any scan whose listing failed).
- A LIST that fails fails every subscriber's scan (a failed scan proves
  nothing); the next subscriber starts a new listing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Hashable
from dataclasses import dataclass, field

from replicators.bucket import Bucket, ObjectState
from replicators.errors import StorageError
from replicators.settings import S3Config

AHEAD = 16
"""Pages a subscriber may hold not yet taken: how far the fastest scan may run ahead of
the slowest before the listing waits. Pages are shared, so this bounds the listing's
memory (16 pages of 1,000 keys: about 4 MB), not each subscriber's."""
PATIENCE = 60.0
"""Seconds the listing waits for a subscriber to take a page before dropping it."""


@dataclass(frozen=True)
class Page:
    after: str | None
    """The key the page's range starts after (None: the bucket's first key)."""
    states: list[ObjectState]
    listed_at: float
    """Wall-clock time at which its LIST request began."""


@dataclass(frozen=True)
class End:
    """The end of a pass: no key after ``after`` (None: the bucket is empty)."""

    after: str | None
    listed_at: float


@dataclass(frozen=True)
class Done:
    """The subscriber has been given every key range."""


@dataclass(frozen=True)
class Failed:
    error: BaseException


Item = Page | End | Done | Failed


@dataclass(eq=False)
class Subscription:
    """One scan's view of the shared listing: ``await next()`` until ``Done``."""

    listing: SharedListing
    joined_at: str | None
    """The ``after`` of the first page it was given (None: a pass from the start)."""
    queue: asyncio.Queue[Item] = field(default_factory=lambda: asyncio.Queue(AHEAD))
    wrapped: bool = False
    finished: bool = False

    async def next(self) -> Item:
        item = await self.queue.get()
        if isinstance(item, Done | Failed):
            self.finished = True
        return item

    def ready(self) -> bool:
        return not self.queue.empty()

    def close(self) -> None:
        """Leave the listing (idempotent); a page the listing is handing over is dropped."""
        self.finished = True
        self.listing._leave(self)
        while not self.queue.empty():
            self.queue.get_nowait()


class SharedListing:
    def __init__(self, cfg: S3Config) -> None:
        self.cfg = cfg
        self.subs: list[Subscription] = []
        self.next_after: str | None = None
        self.passes = 0
        """Passes begun (for tests and the figures)."""
        self.pages = 0
        self._task: asyncio.Task[None] | None = None
        self._ending = False

    def subscribe(self) -> Subscription:
        running = self._task is not None and not self._task.done() and not self._ending
        sub = Subscription(self, self.next_after if running else None)
        self.subs.append(sub)
        if not running:
            self.next_after, self._ending = None, False
            self._task = asyncio.get_running_loop().create_task(self._run())
        return sub

    def _leave(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self.subs.remove(sub)

    async def _run(self) -> None:
        bucket: Bucket | None = None
        try:
            bucket = await Bucket.open(self.cfg)
            while self.subs:
                await self._pass(bucket)
            self._ending = True  # from here a new subscriber starts a listing of its own
        except Exception as exc:  # the LIST failed: every scan under way fails
            self._ending = True
            for sub in list(self.subs):
                self._give_now(sub, Failed(exc))
            self.subs.clear()
        finally:
            if bucket is not None:
                await bucket.aclose()

    async def _pass(self, bucket: Bucket) -> None:
        """List from the first key to the last, handing each page to the subscribers that
        need it; end those that have been given every range."""
        self.passes += 1
        after: str | None = None
        self.next_after = None
        pages = aiter(bucket.scan())
        since: float | None = None  # when the LIST of the next page to hand over began
        last_since: float | None = None  # ... and of the last page handed over
        while self.subs:
            began = time.time()
            since = since or began
            try:
                states = await anext(pages)
            except StopAsyncIteration:
                break
            if not states:
                continue  # its range is the next page's
            page = Page(after, states, since)
            since, last_since = None, since
            self.pages += 1
            # a scan that subscribes while this page is handed over starts after it
            after = self.next_after = states[-1].key
            for sub in list(self.subs):
                await self._give(sub, page)
                if sub.wrapped and sub.joined_at is not None and after >= sub.joined_at:
                    await self._give(sub, Done())  # given (…, joined_at] in this pass too
        # the pass ended: a scan that subscribes now is given the next pass from the start
        self.next_after = None
        # the last page's LIST found no key after it (or, with none, the one that found none)
        end = End(after, last_since or since or time.time())
        for sub in list(self.subs):
            await self._give(sub, end)
            if sub.joined_at is None or sub.wrapped:
                await self._give(sub, Done())
            else:
                sub.wrapped = True  # the keys up to the one it joined after: the next pass

    async def _give(self, sub: Subscription, item: Item) -> None:
        if sub.finished:
            self._leave(sub)
            return
        try:
            async with asyncio.timeout(PATIENCE):
                await sub.queue.put(item)
        except TimeoutError:
            self._leave(sub)
            self._give_now(
                sub, Failed(StorageError(f"the scan took no listing page for {PATIENCE:.0f} s"))
            )
            return
        if isinstance(item, Done):
            self._leave(sub)

    @staticmethod
    def _give_now(sub: Subscription, item: Failed) -> None:
        """Hand over a failure even to a full queue (its pages are dropped)."""
        while sub.queue.full():
            sub.queue.get_nowait()
        sub.queue.put_nowait(item)


_LOOPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, SharedListing]] = (
    weakref.WeakKeyDictionary()
)


def shared_listing(cfg: S3Config) -> SharedListing:
    """The loop's listing of the bucket (and prefix) of ``cfg``."""
    listings = _LOOPS.setdefault(asyncio.get_running_loop(), {})
    key = cfg.model_copy(update={"object_lock": None, "data_client": "botocore"})
    listing = listings.get(key)
    if listing is None:
        listing = listings[key] = SharedListing(cfg)
    return listing
