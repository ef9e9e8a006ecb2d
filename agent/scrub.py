"""The continuous scrub: the region's own vault, every stream in it, checked slowly.

A background job of the daemon (both roles: it only reads). Each step checks one
segment as ``dragent vault verify`` does (fetched, authenticated and opened
under its name, continuous with the one before it; a hole in seq is named as
missing), then waits, so that the scrub costs little:

    wait = min(MAX_WAIT, max(1 / segments_per_second,
                             bytes of the segment / bytes_per_second,
                             pass_period / segments in the vault))

Defaults (``[scrub]`` in ``agent.toml``): a full pass per day (``pass_period``),
but never faster than 20 segments/s nor 4 MiB/s, whichever is slowest. A day
bounds how long a damaged segment goes unnoticed while the source still holds
its WAL (``dragent vault verify --repair`` needs it); 20 GETs/s and 4 MiB/s
(about 340 GiB a day) are small beside what the shippers and sinks move, so a
vault too large for a pass a day is scrubbed more slowly rather than loaded. A
small vault is not scrubbed less often than one segment every ``MAX_WAIT``
seconds (a LIST and a GET: nothing).

Streams are taken in turn, one segment each; the streams are found in the vault
itself (``discover_streams``: one LIST per stream), so a stream no longer
configured is scrubbed too. Superseded segments (``replicators.lineage``) are
left out, as every reader does.

Where each stream's pass stands is kept in ``<data_dir>/scrub.json``
(``checkpoint.save``, at most every ``SAVE_EVERY`` seconds and at every finding),
so a restart goes on where the scrub was. Metrics (``STATS``, registered by the
daemon): ``dragent_scrub_segments_checked_total{stream}``,
``dragent_scrub_bad_segments{stream}`` (the current pass's count, and until it
completes, at least the previous pass's), and
``dragent_scrub_last_pass_completed_timestamp{stream}``. A bad segment is logged
and recorded as a ``scrub.bad-segment`` evidence entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.config import AgentConfig
from agent.supervise import StreamTask
from replicators import checkpoint, lineage, logs
from replicators.errors import IntegrityError, NotFound
from replicators.keys import KeyProvider, build_key_provider, unseal
from replicators.progress import StreamProgress
from replicators.store import ObjectStore
from replicators.store_metrics import StoreMetrics, build_store
from replicators.stream import Applied
from replicators.vault import SegmentRef, Vault

STATE_FILE = "scrub.json"
SAVE_EVERY = 5.0
MAX_WAIT = 300.0
EVIDENCE_KIND = "scrub.bad-segment"
EVIDENCE_WITHIN = 15.0

Record = Callable[[str, dict[str, Any]], Awaitable[None]]


class Rates(Protocol):
    """What the scrub reads of its settings (``agent.config.ScrubConfig``)."""

    @property
    def pass_period(self) -> float: ...
    @property
    def segments_per_second(self) -> float: ...
    @property
    def bytes_per_second(self) -> int: ...


class ScrubStats:
    """The scrub's Prometheus figures, one set per process (a collector)."""

    def __init__(self) -> None:
        self.checked: dict[str, int] = {}
        self.bad: dict[str, int] = {}
        self.completed: dict[str, float] = {}

    def collect(self) -> Iterator[Metric]:
        checked = CounterMetricFamily(
            "dragent_scrub_segments_checked", "Segments the scrub checked.", labels=["stream"]
        )
        bad = GaugeMetricFamily(
            "dragent_scrub_bad_segments",
            "Damaged or missing segments found by the scrub, as of its current pass.",
            labels=["stream"],
        )
        done = GaugeMetricFamily(
            "dragent_scrub_last_pass_completed_timestamp",
            "When the scrub last completed a pass over the stream (Unix time).",
            labels=["stream"],
        )
        for stream, n in sorted(self.checked.items()):
            checked.add_metric([stream], n)
        for stream, n in sorted(self.bad.items()):
            bad.add_metric([stream], n)
        for stream, t in sorted(self.completed.items()):
            done.add_metric([stream], t)
        yield from (checked, bad, done)


STATS = ScrubStats()


@dataclass
class Pass:
    """Where one stream's pass stands (saved in the checkpoint)."""

    after: str | None = None
    """The last segment checked in this pass (None: the pass has not begun)."""
    last: list[int] | None = None
    """(epoch, seq, end) of the last readable segment: the next is checked against it."""
    seen: list[int] | None = None
    """(epoch, seq) of the last segment listed, readable or not (holes are found from it)."""
    checked: int = 0
    bad: list[str] = field(default_factory=list)
    total: int | None = None
    """Segments in the stream when the pass began (None: not counted yet)."""
    first_seqs: dict[str, int] = field(default_factory=dict)
    """The first seq of each epoch when the pass began (which segments are superseded)."""
    previous_bad: int = 0
    completed: float | None = None


class Scrub:
    """The scrub job: ``recover()`` and ``sync_once(stop)`` (``agent.supervise``)."""

    def __init__(
        self,
        vault: Vault,
        keys: KeyProvider,
        state_path: Path,
        rates: Rates,
        *,
        streams: list[str] | None = None,
        stats: ScrubStats = STATS,
        record: Record | None = None,
        save_every: float = SAVE_EVERY,
    ) -> None:
        self.vault = vault
        self.keys = keys
        self.state_path = state_path
        self.rates = rates
        self.fixed_streams = streams
        self.stats = stats
        self.record = record
        self.save_every = save_every
        self.passes: dict[str, Pass] = {}
        self.turn = 0
        self.last_checked: SegmentRef | None = None
        self.log = logs.get("scrub")
        self._saved_at = 0.0
        self._names: list[str] = []

    # -- the runner -------------------------------------------------------------------

    async def recover(self) -> None:
        """Load where every stream's pass stands (nothing: every pass from the start)."""
        try:
            state = checkpoint.load(self.state_path) or {}
        except IntegrityError as exc:
            self.log.warning("scrub checkpoint unreadable: starting over", error=str(exc))
            state = {}
        self.passes = {name: Pass(**p) for name, p in state.get("streams", {}).items()}
        self.turn = int(state.get("turn", 0))
        for name, p in self.passes.items():
            if p.completed is not None:
                self.stats.completed[name] = p.completed
            self.stats.bad[name] = max(len(p.bad), p.previous_bad)

    async def sync_once(self, stop: asyncio.Event) -> bool:
        size = await self.step()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.wait(size)):
                await stop.wait()
        return True

    def wait(self, size: int) -> float:
        """Seconds to wait after checking a segment of ``size`` bytes."""
        total = sum(p.total or 0 for p in self.passes.values())
        r = self.rates
        pace = max(1 / r.segments_per_second, size / r.bytes_per_second)
        return min(MAX_WAIT, max(pace, r.pass_period / max(total, 1)))

    # -- one step ---------------------------------------------------------------------

    async def streams(self) -> list[str]:
        """The streams to scrub: those given, or those the vault holds (found again at the
        start of each round of turns)."""
        if self.fixed_streams is not None:
            return self.fixed_streams
        if self.turn == 0 or not self._names:
            self._names = [s async for s in discover_streams(self.vault.store)]
        return self._names

    async def step(self) -> int:
        """Check the next segment of the stream whose turn it is (or complete its pass);
        return the bytes fetched."""
        names = await self.streams()
        if not names:
            return 0
        self.turn %= len(names)
        name = names[self.turn]
        self.turn = (self.turn + 1) % len(names)
        p = self.passes.setdefault(name, Pass())
        if p.total is None:
            await self._begin(name, p)
        ref = await self._next(name, p)
        if ref is None:
            self._complete(name, p)
            self._save(force=True)
            return 0
        size, problems = await self._check(name, p, ref)
        for key, problem in problems:
            await self._bad(name, p, key, problem)
        self.stats.bad[name] = max(len(p.bad), p.previous_bad)
        self._save(force=bool(problems))
        return size

    async def _begin(self, name: str, p: Pass) -> None:
        """Count the stream's segments and note each epoch's first seq (names only)."""
        first: dict[int, int] = {}
        count = 0
        async for ref in self.vault.segments(name):
            count += 1
            first.setdefault(ref.epoch, ref.seq)
        p.total, p.first_seqs = count, {str(e): s for e, s in first.items()}

    async def _next(self, name: str, p: Pass) -> SegmentRef | None:
        bounds = lineage.boundaries({int(e): s for e, s in p.first_seqs.items()})
        after = SegmentRef.parse(p.after) if p.after else None
        async with contextlib.aclosing(self.vault.segments(name, after=after)) as refs:
            async for ref in refs:
                if not lineage.is_stale(ref, bounds):
                    return ref
        return None

    async def _check(
        self, name: str, p: Pass, ref: SegmentRef
    ) -> tuple[int, list[tuple[str, str]]]:
        """Check ``ref`` as ``vault verify`` does; (bytes fetched, problems by segment)."""
        problems: list[tuple[str, str]] = []
        if p.seen is not None and p.seen[0] == ref.epoch:
            for seq in range(p.seen[1] + 1, ref.seq):
                problems.append((SegmentRef(ref.epoch, seq, name).key, "missing"))
        p.seen = [ref.epoch, ref.seq]
        size = 0
        try:
            blob = await self.vault.get_segment(ref)
            size = len(blob)
            opened = await unseal(
                blob, self.keys, expect_stream=name, expect_epoch=ref.epoch, expect_seq=ref.seq
            )
        except NotFound:
            problems.append((ref.key, "missing (removed since it was listed)"))
            p.last = None
        except IntegrityError as exc:
            problems.append((ref.key, str(exc)))
            p.last = None  # its end is unknown: the next is not compared with it
        else:
            h = opened.header
            if p.last is not None and not problems:
                last_ref = SegmentRef(p.last[0], p.last[1], name)
                try:
                    lineage.check_continuity(
                        Applied(ref=last_ref, end=p.last[2], source_time=0.0), ref, h
                    )
                except IntegrityError as exc:
                    problems.append((ref.key, str(exc)))
            p.last = [ref.epoch, ref.seq, int(h.end)] if h.end.isdigit() else None
        p.after = ref.key
        p.checked += 1
        self.last_checked = ref
        self.stats.checked[name] = self.stats.checked.get(name, 0) + 1
        return size, problems

    async def _bad(self, name: str, p: Pass, key: str, problem: str) -> None:
        if key in p.bad:
            return
        p.bad.append(key)
        self.log.error("scrub found a bad segment", stream=name, segment=key, error=problem)
        if self.record is not None:
            try:
                await self.record(EVIDENCE_KIND, {"stream": name, "segment": key, "error": problem})
            except Exception as exc:  # best effort: the finding is logged above
                self.log.warning(
                    "scrub finding not recorded as evidence", error=f"{type(exc).__name__}: {exc}"
                )

    def _complete(self, name: str, p: Pass) -> None:
        now = time.time()
        self.log.info("scrub pass completed", stream=name, segments=p.checked, bad=len(p.bad))
        self.stats.completed[name] = now
        self.stats.bad[name] = len(p.bad)
        self.passes[name] = Pass(previous_bad=len(p.bad), completed=now)

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._saved_at < self.save_every:
            return
        state = {"turn": self.turn, "streams": {n: asdict(p) for n, p in self.passes.items()}}
        checkpoint.save(self.state_path, state)
        self._saved_at = now

    async def aclose(self) -> None:
        self._save(force=True)


async def discover_streams(store: ObjectStore) -> AsyncIterator[str]:
    """The streams a vault holds: one LIST with a delimiter per 1,000 streams where the
    store can (``children``), else one LIST each: after a stream's first key, the listing
    starts past all of its keys (``/~`` sorts after every segment name under it)."""
    children = getattr(store, "children", None)
    if children is not None:
        with contextlib.suppress(NotImplementedError):
            for name in await children("streams/"):
                yield name
            return
    after: str | None = None
    while True:
        name = None
        async with contextlib.aclosing(store.list("streams/", start_after=after)) as infos:
            async for info in infos:
                parts = info.key.split("/")
                if len(parts) >= 3:
                    name = parts[1]
                    break
        if name is None:
            return
        yield name
        after = f"streams/{name}/~"


class EvidenceRecorder:
    """Appends the scrub's findings to this region's evidence log (opened for each: they
    are rare), within ``EVIDENCE_WITHIN`` seconds."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg

    async def __call__(self, kind: str, data: dict[str, Any]) -> None:
        from agent.evidence import EvidenceLog

        async with asyncio.timeout(EVIDENCE_WITHIN):
            log = await EvidenceLog.open(self.cfg)
            try:
                await log.append(kind, data)
            finally:
                await log.aclose()


async def scrub_tasks(
    cfg: AgentConfig, stack: AsyncExitStack, store_metrics: StoreMetrics | None = None
) -> list[StreamTask]:
    """The scrub job of this region's own vault, if ``[scrub] enabled``."""
    if not cfg.scrub.enabled:
        return []
    names = [s.name for s in cfg.streams]
    store = await build_store(
        cfg.vault, store_metrics, f"scrub-{cfg.region}", destination=cfg.region, streams=names
    )
    stack.push_async_callback(store.aclose)
    keys = build_key_provider(cfg.keys)
    stack.push_async_callback(keys.aclose)
    recorder = EvidenceRecorder(cfg)
    scrub = Scrub(Vault(store), keys, cfg.data_dir / STATE_FILE, cfg.scrub, record=recorder)
    stack.push_async_callback(scrub.aclose)
    progress = StreamProgress(stream="vault", kind="scrub", side="job", peer="scrub")
    return [StreamTask("vault:scrub", scrub, progress)]
