"""The passive side: applies object records to the mirror bucket.

Per key, records apply in stream order (different keys concurrently):

- put: written with the source's content type and user metadata plus ours
  (``dragent-xxh3``: content hash; ``dragent-version``: ``TIME.SEQ``);
- part: part 0 starts a multipart upload (its id is saved in the state file
  at once), each part is uploaded as part ``index + 1``, the last one
  completes the upload — so a large object is never whole in memory here
  either, and its parts may span many segments;
- delete: deletes.

A record is skipped when the mirror already holds the key at a version at
least as new (so a re-applied segment changes nothing, and an older state
never overwrites a newer one, e.g. one written by a repair). A put or delete
of a key aborts that key's unfinished upload. The state file (crash-safe)
holds the last applied segment and the open uploads; a crash mid-segment
re-applies the segment with the same result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, ClassVar

from replicators import checkpoint
from replicators.bucket import Bucket
from replicators.errors import IntegrityError, NotFound, StorageError
from replicators.objects import records as rec
from replicators.segment import SegmentHeader
from replicators.stream import Applied
from replicators.vault import SegmentRef

KIND = "objects"
APPLY_CONCURRENCY = 16
MAX_PARTS = 10_000
"""S3's limit on the parts of one multipart upload (part numbers 1..10000)."""


def mirror_metadata(head: rec.Head, version: rec.Version) -> dict[str, str]:
    return {
        **head.metadata,
        rec.META_HASH: head.content_hash,
        rec.META_VERSION: version.encode(),
    }


class MirrorTarget:
    KIND: ClassVar[str] = KIND

    def __init__(self, bucket: Bucket, state_dir: Path) -> None:
        self.bucket = bucket
        self.state_path = state_dir / "mirror.json"
        self._state: dict[str, Any] = {"uploads": {}}
        self.applied_records = 0
        self.skipped_records = 0

    async def state(self) -> Applied | None:
        state = checkpoint.load(self.state_path)
        if state is None:
            return None
        self._state = state
        if "seq" not in state:
            return None
        ref = SegmentRef(epoch=state["epoch"], seq=state["seq"], stream=state["stream"])
        return Applied(ref=ref, end=state["end"], source_time=state["source_time"])

    async def apply(self, ref: SegmentRef, header: SegmentHeader, records: Sequence[bytes]) -> None:
        """Apply a segment: each key's records in order, different keys concurrently."""
        chains: dict[str, list[rec.Record]] = {}
        for raw in records:
            record = rec.decode(raw)
            chains.setdefault(record.key, []).append(record)
        slots = asyncio.Semaphore(APPLY_CONCURRENCY)

        async def chain(items: list[rec.Record]) -> None:
            for record in items:
                async with slots:
                    await self.apply_record(record)

        try:
            async with asyncio.TaskGroup() as tg:
                for items in chains.values():
                    tg.create_task(chain(items))
        except* Exception as group:  # the first error, unwrapped: callers classify it
            raise group.exceptions[0] from None
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

    async def apply_record(self, record: rec.Record) -> None:
        if isinstance(record, rec.Part):
            await self._part(record)
            return
        await self._abort(record.key)
        current = await self.current_version(record.key)
        if current is not None and current >= record.version:
            self.skipped_records += 1
            return
        if isinstance(record, rec.Put):
            meta = mirror_metadata(record.head, record.version)
            await self.bucket.write(record.key, record.body, record.head.content_type, meta)
        elif current is not None:
            await self.bucket.delete(record.key)
        self.applied_records += 1

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
            uploads.pop(part.key)
            self._save()
            self.applied_records += 1

    async def _begin(self, part: rec.Part) -> dict[str, Any]:
        current = await self.current_version(part.key)
        upload: dict[str, Any] = {
            "version": part.version.encode(),
            "id": None,
            "etags": [],
            "count": part.count,
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
        await self.bucket.aclose()
