"""Ships one stream from its source to one destination region's vault.

``sync_once()`` is the whole job, idempotent and safe to repeat: take one
batch from the source, seal it into the next segment, publish it in the
destination vault, record the new position, and only then acknowledge it to
the source. A crash at any point loses nothing: on ``recover()`` the shipper
reads its checkpoint, adopts any segment published after it (so none is sent
twice) and resumes the source from the end of the last durable segment.

The RPO it feeds (``StreamProgress``) rests on proofs: a step that returned a
batch and made it durable proves what the source no longer holds
(``step_done``); a source may also offer ``head()``, its head read
independently of capture (``replicators.progress.Head``). Recovering proves
nothing: it only says where the stream resumes.

The epoch in every name is a fencing token: a shipper that finds a newer
epoch in the log is stale and halts (``IntegrityError``). A name already
taken when publishing is adopted only if it holds the same range and records
(this shipper's own PUT, retried after a lost reply); otherwise a second
writer of the same stream and epoch exists, and the shipper halts rather
than merge two logs.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from replicators import checkpoint
from replicators.errors import AlreadyExists, IntegrityError
from replicators.keys import KeyProvider, unseal
from replicators.metrics import StreamMetrics
from replicators.progress import StreamProgress
from replicators.segment import seal
from replicators.stream import Change, Source
from replicators.vault import SegmentRef, Vault


@dataclass(frozen=True)
class ShipperSettings:
    stream: str
    destination: str
    epoch: int
    segment_max_bytes: int
    segment_max_age: float


class Shipper:
    def __init__(
        self,
        settings: ShipperSettings,
        source: Source,
        vault: Vault,
        keys: KeyProvider,
        state_path: Path,
        progress: StreamProgress,
        metrics: StreamMetrics,
    ) -> None:
        self.settings = settings
        self.source = source
        self.vault = vault
        self.keys = keys
        self.state_path = state_path
        self.progress = progress
        self.metrics = metrics
        self.last: SegmentRef | None = None
        self.end = 0
        progress.source_pending = source.pending_since
        progress.source_head = getattr(source, "head", None)
        progress.source_floor = getattr(source, "unrestorable_since", None)

    async def recover(self) -> None:
        """Find the last durable segment (checkpoint, then the vault) and resume the source."""
        state = checkpoint.load(self.state_path)
        durable_time: float | None = None
        if state is not None:
            self.last = SegmentRef(epoch=state["epoch"], seq=state["seq"], stream=state["stream"])
            self.end = int(state["end"])
            durable_time = _source_time(state)
            # before any vault I/O, which may fail: the RPO counts from here, not from now
            self.progress.count_from(durable_time)
        async for ref in self.vault.segments(self.settings.stream, after=self.last):
            self._not_stale(ref)
            blob = await self.vault.get_segment(ref)
            opened = await unseal(blob, self.keys, expect_stream=ref.stream, expect_seq=ref.seq)
            self.last, self.end = ref, int(opened.header.end)
            durable_time = opened.header.last_source_time
            self._save(durable_time)
        note = getattr(self.source, "note_durable_time", None)
        if note is not None:
            note(durable_time)
        await self.source.resume(self.end)
        await self.source.ack(self.end)
        self.progress.resumed(self.end, durable_time, time.time())

    async def sync_once(self, stop: asyncio.Event) -> bool:
        """Ship one batch. Returns False when the source had nothing (stop was set)."""
        s = self.settings
        began = time.time()
        batch = await self.source.next_batch(int(s.segment_max_bytes), s.segment_max_age, stop)
        if not batch:
            return False  # cut short by the stop: no proof of anything
        now = time.time()
        self.progress.capture(batch[-1].end, batch[-1].source_time, now, batch[0].source_time)
        await self._publish(batch)
        self.progress.step_done(began)
        return True

    async def _publish(self, batch: list[Change]) -> None:
        s = self.settings
        seq = self.last.seq + 1 if self.last else 1
        ref = SegmentRef(epoch=s.epoch, seq=seq, stream=s.stream)
        records = [c.payload for c in batch]
        data_key = await self.keys.data_key()
        blob = await asyncio.to_thread(
            seal,
            records,
            stream=s.stream,
            epoch=s.epoch,
            seq=seq,
            start=str(batch[0].start),
            end=str(batch[-1].end),
            first_source_time=batch[0].source_time,
            last_source_time=batch[-1].source_time,
            data_key=data_key,
            created_at=time.time(),
        )
        with self.metrics.put_seconds.time():
            try:
                await self.vault.put_segment(ref, blob)
            except AlreadyExists:
                await self._same_as_published(ref, batch)
        self.last, self.end = ref, batch[-1].end
        await asyncio.to_thread(self._save, batch[-1].source_time)
        await self.source.ack(self.end)
        now = time.time()
        self.progress.durable(self.end, batch[-1].source_time, now, None)
        self.metrics.sealed(records, len(blob), now - batch[0].source_time)

    def _not_stale(self, ref: SegmentRef) -> None:
        """A segment of a newer epoch in the log means another region holds the lease: this
        shipper is stale and must write nothing more. Raises ``IntegrityError`` (halts)."""
        if ref.epoch > self.settings.epoch:
            raise IntegrityError(
                f"the vault holds epoch {ref.epoch} and this shipper writes epoch "
                f"{self.settings.epoch}: a newer lease holder ships this stream",
                where=f"segment {ref.key}",
                hint="this region must not ship: check that it is fenced",
            )

    async def _same_as_published(self, ref: SegmentRef, batch: list[Change]) -> None:
        """The name was taken. Ours if it holds the same range and records (a PUT retried
        after its reply was lost): adopt it. Anything else is a second writer of this
        stream and epoch: raise ``IntegrityError`` (halts, never merges two logs)."""
        opened = await unseal(
            await self.vault.get_segment(ref),
            self.keys,
            expect_stream=ref.stream,
            expect_epoch=ref.epoch,
            expect_seq=ref.seq,
        )
        h = opened.header
        ours = (str(batch[0].start), str(batch[-1].end), [c.payload for c in batch])
        if (h.start, h.end, opened.records) != ours:
            raise IntegrityError(
                f"another shipper published this name with range [{h.start}, {h.end}), this "
                f"one holds [{batch[0].start}, {batch[-1].end}): two writers of one stream",
                where=f"segment {ref.key}",
                hint="run one active agent per stream and destination",
            )

    def _save(self, source_time: float) -> None:
        assert self.last is not None
        state = {
            "stream": self.last.stream,
            "epoch": self.last.epoch,
            "seq": self.last.seq,
            "end": self.end,
            "source_time": source_time,
            "destination": self.settings.destination,
        }
        checkpoint.save(self.state_path, state)


def _source_time(state: dict[str, object]) -> float | None:
    """The checkpoint's last durable source time (None in a checkpoint written without it)."""
    value = state.get("source_time")
    return float(value) if isinstance(value, int | float) else None
