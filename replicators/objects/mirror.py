"""The passive side: applies object records to the mirror bucket.

Per key, records apply in stream order (different keys concurrently):

- put: written with the source's content type and user metadata plus ours
  (``dragent-xxh3``: content hash; ``dragent-version``: ``TIME.SEQ``);
- part: part 0 starts a multipart upload (its id is saved in the state file
  at once), each part is uploaded as part ``index + 1``, the last one
  completes the upload — so a large object is never whole in memory here
  either, and its parts may span many segments;
- delete: deletes, unless the mass-delete guard holds it (below).

A put is first tried as a create-only PUT (``If-None-Match: *``): when the key
is absent (a cold copy: every key) that is one request instead of a HEAD and
a PUT, and a create replaces nothing. Otherwise (or when creates have mostly
failed of late) the mirror's version is read first: a record is skipped when
the mirror already holds the key at a version at least as new (so a
re-applied segment changes nothing, and an older state never overwrites a
newer one, e.g. one written by a repair). A put or delete
of a key aborts that key's unfinished upload. The state file (crash-safe)
holds the last applied segment and the open uploads; a crash mid-segment
re-applies the segment with the same result.

The mass-delete guard (``guard.py``; docs/objects-guard.md): a delete that
would make the deletes applied within the window exceed the policy trips it;
from then on every delete is *held* (kept in ``delete-guard.json`` with its
segment and position, saved before the segment counts as applied) while puts
keep being applied, and a put of a held key supersedes its held delete. The
segment still counts as applied (the RPO and lag stay true). An operator's
decision (``held.DECISION_FILE``) is carried out at the next segment or within
``DECISION_POLL`` seconds: approve deletes the held keys in stream order (one
put again since is left), reject keeps them and records the rejection for the
verify.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, ClassVar

from replicators import checkpoint, logs
from replicators.bucket import Bucket
from replicators.errors import AlreadyExists, IntegrityError, NotFound, StorageError
from replicators.objects import held
from replicators.objects import records as rec
from replicators.objects.guard import DeleteWindow, GuardPolicy
from replicators.s3 import S3Store
from replicators.segment import SegmentHeader
from replicators.stream import Applied
from replicators.vault import SegmentRef

KIND = "objects"
APPLY_CONCURRENCY = 16
MAX_PARTS = 10_000
"""S3's limit on the parts of one multipart upload (part numbers 1..10000)."""
CREATE_MISSES = 8.0
CREATE_PROBE = 0.25
"""A put is first tried as a create (no HEAD: a cold copy's keys are all new) unless about
``CREATE_MISSES`` creates failed of late (the keys exist: an update-heavy stream); then
one in 1 / ``CREATE_PROBE`` puts tries again."""
DECISION_POLL = 2.0
"""How often a target with held deletes looks for an operator's decision."""
log = logs.get("objects")


def mirror_metadata(head: rec.Head, version: rec.Version) -> dict[str, str]:
    return {
        **head.metadata,
        rec.META_HASH: head.content_hash,
        rec.META_VERSION: version.encode(),
    }


class MirrorTarget:
    KIND: ClassVar[str] = KIND

    def __init__(self, bucket: Bucket, state_dir: Path, guard: GuardPolicy | None = None) -> None:
        self.bucket = bucket
        self.state_dir = state_dir
        self.state_path = state_dir / "mirror.json"
        self._state: dict[str, Any] = {"uploads": {}}
        self.applied_records = 0
        self.skipped_records = 0
        self.policy = guard or GuardPolicy()
        saved = held.read_guard(state_dir)
        self.window = DeleteWindow(self.policy, [(t, k) for t, k in saved["window"]])
        self.hold: dict[str, Any] | None = saved["hold"]
        self.held: dict[str, dict[str, Any]] = {d["key"]: d for d in saved["held"]}
        self.stream: str = (self.hold or {}).get("stream", "")
        self.mirror_keys: int | None = None
        """The mirror's keys: listed once when the guard first needs it, then kept."""
        self._guard_dirty = False
        self._create_misses = 0.0
        self._lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        self.closed = False
        held.track(self)

    def held_count(self) -> int:
        return len(self.held) if self.hold is not None else 0

    async def state(self) -> Applied | None:
        if self._watch is None:
            self._watch = asyncio.create_task(self._watch_decisions())
        state = checkpoint.load(self.state_path)
        if state is None:
            return None
        self._state = state
        self.stream = self.stream or state.get("stream", "")
        if "seq" not in state:
            return None
        ref = SegmentRef(epoch=state["epoch"], seq=state["seq"], stream=state["stream"])
        return Applied(ref=ref, end=state["end"], source_time=state["source_time"])

    async def apply(self, ref: SegmentRef, header: SegmentHeader, records: Sequence[bytes]) -> None:
        """Apply a segment: each key's records in order, different keys concurrently."""
        async with self._lock:
            self.stream = ref.stream
            await self._decide()  # held deletes come before this segment in stream order
            await self._apply(ref, header, records)

    async def _apply(
        self, ref: SegmentRef, header: SegmentHeader, records: Sequence[bytes]
    ) -> None:
        chains: dict[str, list[tuple[int, rec.Record]]] = {}
        start = int(header.start) if header.start.isdigit() else 0
        deletes = False
        for i, raw in enumerate(records):
            record = rec.decode(raw)
            deletes = deletes or isinstance(record, rec.Delete)
            chains.setdefault(record.key, []).append((start + i, record))
        if deletes and self.policy.enabled and self.hold is None and self.mirror_keys is None:
            await self._count_keys()
        slots = asyncio.Semaphore(APPLY_CONCURRENCY)

        async def chain(items: list[tuple[int, rec.Record]]) -> None:
            for position, record in items:
                async with slots:
                    await self.apply_record(record, (ref.key, position))

        try:
            async with asyncio.TaskGroup() as tg:
                for items in chains.values():
                    tg.create_task(chain(items))
        except* Exception as group:  # the first error, unwrapped: callers classify it
            raise group.exceptions[0] from None
        if self._guard_dirty:  # the held deletes are durable before the segment counts
            self._save_guard()
        self._state |= {
            "stream": ref.stream,
            "epoch": ref.epoch,
            "seq": ref.seq,
            "end": int(header.end),
            "source_time": header.last_source_time,
            "applied_at": time.time(),
        }
        self._save()

    def _save(self) -> None:
        checkpoint.save(self.state_path, self._state)

    async def current_version(self, key: str) -> rec.Version | None:
        """The mirror's version of ``key`` (None: absent, or not written by a mirror)."""
        try:
            head = await self.bucket.head(key)
        except NotFound:
            return None
        text = head.metadata.get(rec.META_VERSION)
        try:
            return rec.Version.decode(text) if text else rec.Version(0, 0)
        except IntegrityError:
            return rec.Version(0, 0)

    async def apply_record(self, record: rec.Record, where: tuple[str, int] | None = None) -> None:
        """Apply one record; ``where``: its segment and position (for a held delete)."""
        if isinstance(record, rec.Part):
            if record.index == 0:
                self._supersede(record, where)
            await self._part(record)
            return
        await self._abort(record.key)
        if isinstance(record, rec.Put):
            self._supersede(record, where)
            if await self._create(record):
                return
        current = await self.current_version(record.key)
        if current is not None and current >= record.version:
            self.skipped_records += 1
            return
        # the key count changes before the write: concurrent keys' decisions see it
        if isinstance(record, rec.Put):
            if current is None and self.mirror_keys is not None:
                self.mirror_keys += 1
            meta = mirror_metadata(record.head, record.version)
            await self.bucket.write(record.key, record.body, record.head.content_type, meta)
        elif current is not None:
            if self._held_back(record, where or ("", 0)):
                return
            if self.mirror_keys is not None:
                self.mirror_keys -= 1
            await self.bucket.delete(record.key)
        self.applied_records += 1

    async def _create(self, record: rec.Put) -> bool:
        """Write a put whose key the mirror most likely lacks without reading its version
        first: a create-only PUT (``If-None-Match: *``), which never replaces anything, so
        no newer version can be lost. True if written; False if the key exists (or
        creates have mostly failed of late): then the version is read and compared."""
        if self._create_misses >= CREATE_MISSES or not isinstance(self.bucket, S3Store):
            self._create_misses -= CREATE_PROBE  # creates are tried again now and then
            return False
        if self.mirror_keys is not None:
            self.mirror_keys += 1
        meta = mirror_metadata(record.head, record.version)
        try:
            await self.bucket.create(record.key, record.body, record.head.content_type, meta)
        except AlreadyExists:
            if self.mirror_keys is not None:
                self.mirror_keys -= 1
            self._create_misses += 1
            return False
        self._create_misses = max(0.0, self._create_misses - 1)
        self.applied_records += 1
        return True

    # -- the mass-delete guard ------------------------------------------------------------

    def _supersede(self, record: rec.Put | rec.Part, where: tuple[str, int] | None) -> None:
        """A put of a key whose delete is held, later in the stream: the key exists again,
        the delete is moot. (Later by position: a put's version time is the source's
        LastModified, whole seconds, so it may be below that of a delete just before it.)"""
        entry = self.held.get(record.key)
        if entry is None:
            return
        later = (
            entry["position"] < where[1]
            if where is not None
            else rec.Version.decode(entry["version"]) < record.version
        )
        if later:
            del self.held[record.key]
            self._guard_dirty = True

    def _held_back(self, record: rec.Delete, where: tuple[str, int]) -> bool:
        """Hold this delete (True) if the guard holds deletes or this one trips it; else
        count it in the window (False: apply it)."""
        if not self.policy.enabled:
            return False
        now = time.time()
        if self.hold is None:
            why = self.window.trips(now, self.mirror_keys or 0)
            if why is None:
                self.window.record(now, record.key)
                self._guard_dirty = True
                return False
            self._trip(why, now)
        entry = self.held.get(record.key)
        if entry is None or rec.Version.decode(entry["version"]) < record.version:
            segment, position = where
            self.held[record.key] = {
                "key": record.key,
                "version": record.version.encode(),
                "segment": segment,
                "position": position,
                "held_at": now,
            }
            self._guard_dirty = True
        return True

    def _trip(self, why: str, now: float) -> None:
        p = self.policy
        self.hold = {
            "id": f"{int(now)}-{uuid.uuid4().hex[:8]}",
            "stream": self.stream,
            "since": now,
            "reason": why,
            "policy": {"share": p.share, "count": p.count, "window": p.window},
            "mirror_keys": self.mirror_keys,
            "applied_before": self.window.keys(),
        }
        self._save_guard()
        log.error(
            "mass delete: the mirror's deletes are held",
            stream=self.stream,
            hold=self.hold["id"],
            reason=why,
            applied_before=len(self.window),
            hint=f"dragent objects deletes status|approve|reject --stream {self.stream}",
        )

    def _save_guard(self) -> None:
        self._guard_dirty = False
        held.write_guard(
            self.state_dir,
            {
                "window": [[t, k] for t, k in self.window.entries],
                "hold": self.hold,
                "held": sorted(self.held.values(), key=lambda e: e["position"]),
            },
        )

    async def _count_keys(self) -> None:
        n = 0
        async for page in self.bucket.scan():
            n += len(page)
        self.mirror_keys = n

    async def _decide(self) -> None:
        """Carry out an operator's decision on the hold, if there is one (under the lock)."""
        decision = held.read_decision(self.state_dir)
        if decision is None:
            return
        if self.hold is None or decision.get("hold") != self.hold["id"]:
            log.warning("a decision on no current hold: ignored", decision=decision)
            held.clear_decision(self.state_dir)
            return
        deletes = sorted(self.held.values(), key=lambda e: e["position"])
        applied = skipped = 0
        if decision.get("decision") == "approve":
            for e in deletes:
                current = await self.current_version(e["key"])
                if current is None or current >= rec.Version.decode(e["version"]):
                    skipped += 1  # put again since (or already gone)
                    continue
                await self.bucket.delete(e["key"])
                applied += 1
                if self.mirror_keys is not None:
                    self.mirror_keys -= 1
        elif decision.get("decision") == "reject":
            held.record_rejection(self.state_dir, self.hold["id"], deletes)
        else:
            log.warning("unknown decision on held deletes: ignored", decision=decision)
            held.clear_decision(self.state_dir)
            return
        hold_id = self.hold["id"]
        self.hold, self.held = None, {}
        self.window.clear()
        self._save_guard()
        held.clear_decision(self.state_dir)
        log.warning(
            f"held deletes {decision['decision']}d",
            stream=self.stream,
            hold=hold_id,
            held=len(deletes),
            deleted=applied,
            skipped=skipped,
        )

    async def _watch_decisions(self) -> None:
        """While deletes are held, look for a decision every ``DECISION_POLL`` seconds."""
        while True:
            await asyncio.sleep(DECISION_POLL)
            if self.hold is None or not (self.state_dir / held.DECISION_FILE).exists():
                continue
            try:
                async with self._lock:
                    await self._decide()
            except Exception as exc:  # retried at the next poll or segment
                log.warning("held deletes: decision not carried out yet", error=str(exc))

    async def _abort(self, key: str) -> None:
        upload = self._state["uploads"].pop(key, None)
        if upload and upload.get("id"):
            with suppress(StorageError):
                await self.bucket.abort_upload(key, upload["id"])
            self._save()

    async def _part(self, part: rec.Part) -> None:
        uploads: dict[str, Any] = self._state["uploads"]
        version = part.version.encode()
        upload = uploads.get(part.key)
        if part.index == 0 and (upload is None or upload["version"] != version):
            await self._abort(part.key)
            upload = await self._begin(part)
        if upload is None or upload["version"] != version:
            raise IntegrityError(
                f"part {part.index} of {part.key!r} version {version} without its upload",
                hint="the stream lost part 0; run an objects verify with repair",
            )
        if upload["id"] is None:  # the mirror already holds a newer version
            if part.last:
                uploads.pop(part.key)
                self.skipped_records += 1
            return
        etags: list[str] = upload["etags"]
        what = f"part {part.index} of {part.count} of {part.key!r} version {version}"
        if part.count > MAX_PARTS:
            raise IntegrityError(f"{what}: S3 allows at most {MAX_PARTS} parts")
        if part.count != upload.get("count", part.count):
            raise IntegrityError(
                f"{what}: its part 0 said {upload['count']} parts",
                hint="the stream's parts disagree; run an objects verify with repair",
            )
        if part.index > len(etags):
            raise IntegrityError(
                f"{what}: only {len(etags)} parts before it were applied",
                hint="the stream's parts are out of order; run an objects verify with repair",
            )
        try:
            etag = await self.bucket.upload_part(part.key, upload["id"], part.index + 1, part.body)
        except NotFound:
            await self._completed_before(part)
            return
        etags[part.index : part.index + 1] = [etag]
        if part.last:
            if len(etags) != part.count:
                raise IntegrityError(
                    f"last part of {part.key!r} version {version} says {part.count} parts, "
                    f"{len(etags)} were uploaded",
                    hint="the stream's parts disagree; run an objects verify with repair",
                )
            try:
                await self.bucket.finish_upload(part.key, upload["id"], etags[: part.count])
            except NotFound:
                await self._completed_before(part)
                return
            if uploads.pop(part.key).get("new") and self.mirror_keys is not None:
                self.mirror_keys += 1
            self._save()
            self.applied_records += 1

    async def _begin(self, part: rec.Part) -> dict[str, Any]:
        current = await self.current_version(part.key)
        upload: dict[str, Any] = {
            "version": part.version.encode(),
            "id": None,
            "etags": [],
            "count": part.count,
            "new": current is None,
        }
        if current is None or current < part.version:
            meta = mirror_metadata(part.head, part.version)
            upload["id"] = await self.bucket.start_upload(part.key, part.head.content_type, meta)
        self._state["uploads"][part.key] = upload
        self._save()
        return upload

    async def _completed_before(self, part: rec.Part) -> None:
        """The upload is gone: fine if it was completed (a re-applied segment), else an error."""
        current = await self.current_version(part.key)
        if current is not None and current >= part.version:
            self._state["uploads"].pop(part.key, None)
            return
        raise IntegrityError(f"the upload of {part.key!r} version {part.version} vanished")

    async def aclose(self) -> None:
        self.closed = True
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.wait([self._watch])  # a cancellation of aclose's caller goes on
        await self.bucket.aclose()
