"""Point-in-time recovery of a bucket or prefix from the vault's segment log.

The vault keeps every segment of an objects stream, so it holds every
captured version of every key. ``restore`` replays the log in two passes:

1. Read every segment in log order (``replicators.logread``: each one fully
   verified, its name bound to its header, continuous with the one before,
   superseded epochs left out) and keep, per key under the prefix, the
   record of the greatest version whose time is at or before ``to`` — a put
   (inline, or the parts of a large object) or a delete. Only references
   are kept (segment, record number): memory is O(keys under the prefix),
   never the objects' bytes.
2. Write the winning puts into the target bucket, grouped by segment so a
   segment is fetched once for its inline objects; a large object is
   streamed part by part as a multipart upload. Keys whose last record at
   ``to`` is a delete (or that had no version yet) are not written.

Cost: one read and decryption of every segment of the stream (the whole
log), then one more read of each segment holding a restored version. A put's
time is the source's LastModified; a delete's is when it was observed (by an
event within seconds, by the scan within its interval).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from replicators.bucket import Bucket
from replicators.errors import IntegrityError
from replicators.keys import KeyProvider
from replicators.logread import LogWalk
from replicators.objects import records as rec
from replicators.vault import SegmentRef, Vault


@dataclass
class Winner:
    """The state of one key at the restore time: a delete, an inline put or a part list."""

    record: rec.Record
    where: list[tuple[SegmentRef, int]] = field(default_factory=list)


@dataclass
class RestoreResult:
    objects: int = 0
    bytes: int = 0
    deleted_at_time: int = 0
    segments_read: int = 0


class Planner:
    """Keeps the last complete state of each key; a large object counts once all its
    parts are seen (a transfer abandoned because the object changed never wins)."""

    def __init__(self, prefix: str, to_ns: int) -> None:
        self.prefix = prefix
        self.to_ns = to_ns
        self.winners: dict[str, Winner] = {}
        self._partial: dict[str, Winner] = {}

    def add(self, record: rec.Record, ref: SegmentRef, n: int) -> None:
        """Consider one record; of two states of a key the greater version wins, whatever
        their order in the log."""
        if not record.key.startswith(self.prefix) or record.version.time_ns > self.to_ns:
            return
        current = self.winners.get(record.key)
        if current is not None and record.version < current.record.version:
            return
        if not isinstance(record, rec.Part):
            self.winners[record.key] = Winner(record, [(ref, n)])
            return
        w = self._partial.get(record.key)
        if record.index == 0 or w is None or w.record.version != record.version:
            w = self._partial[record.key] = Winner(record, [])
        if record.index == len(w.where):
            w.where.append((ref, n))
        if record.last and len(w.where) == record.count:
            self.winners[record.key] = self._partial.pop(record.key)


async def plan(
    vault: Vault,
    keys: KeyProvider,
    stream: str,
    prefix: str,
    to_ns: int,
    refs: list[SegmentRef],
    bar: Callable[[int], None] = lambda n: None,
) -> tuple[dict[str, Winner], int]:
    """Pass 1: the winning record of every key under ``prefix`` at ``to_ns`` (every
    segment verified, names bound, continuity checked: ``replicators.logread``)."""
    planner = Planner(prefix, to_ns)
    walk = LogWalk(vault, keys, stream)
    async for ref, opened in walk.read(refs, bar):
        for n, raw in enumerate(opened.records):
            planner.add(rec.decode(raw), ref, n)
    return planner.winners, len(refs)


async def restore(
    vault: Vault,
    keys: KeyProvider,
    stream: str,
    prefix: str,
    to_ns: int,
    into: Bucket,
    progress: bool = True,
) -> RestoreResult:
    """Rebuild the state of ``prefix`` at ``to_ns`` (unix ns) into ``into``.

    Idempotent (re-running writes the same objects). Raises ``IntegrityError``
    for a segment that fails verification or a large object missing parts.
    """
    out = RestoreResult()
    walk = LogWalk(vault, keys, stream)
    refs = await walk.refs()
    with tqdm(
        total=len(refs), desc="reading the log", unit="seg", file=sys.stderr, disable=not progress
    ) as bar:
        winners, out.segments_read = await plan(
            vault, keys, stream, prefix, to_ns, refs, bar.update
        )
    puts = {k: w for k, w in winners.items() if not isinstance(w.record, rec.Delete)}
    out.deleted_at_time = len(winners) - len(puts)
    by_segment: dict[SegmentRef, list[tuple[str, int]]] = defaultdict(list)
    large = []
    for key, w in puts.items():
        if isinstance(w.record, rec.Part):
            large.append(w)
        else:
            by_segment[w.where[0][0]].append((key, w.where[0][1]))
    with tqdm(
        total=len(puts), desc="restoring", unit="obj", file=sys.stderr, disable=not progress
    ) as bar:
        for ref in sorted(by_segment):
            opened = await walk.open(ref)
            for _, n in by_segment[ref]:
                put = rec.decode(opened.records[n])
                assert isinstance(put, rec.Put)
                await into.write(put.key, put.body, put.head.content_type, put.head.metadata)
                out.objects += 1
                out.bytes += len(put.body)
                bar.update(1)
        for w in large:
            out.bytes += await _restore_large(vault, keys, stream, w, into)
            out.objects += 1
            bar.update(1)
    return out


async def _restore_large(
    vault: Vault, keys: KeyProvider, stream: str, w: Winner, into: Bucket
) -> int:
    first = w.record
    assert isinstance(first, rec.Part)
    if len(w.where) != first.count:
        raise IntegrityError(
            f"object {first.key!r} version {first.version.encode()}: "
            f"{len(w.where)} of {first.count} parts in the log"
        )
    head = first.head
    upload = await into.start_upload(first.key, head.content_type, head.metadata)
    etags = []
    walk = LogWalk(vault, keys, stream)
    for number, (ref, n) in enumerate(w.where, start=1):
        opened = await walk.open(ref)
        part = rec.decode(opened.records[n])
        assert isinstance(part, rec.Part)
        etags.append(await into.upload_part(first.key, upload, number, part.body))
    await into.finish_upload(first.key, upload, etags)
    return head.size
