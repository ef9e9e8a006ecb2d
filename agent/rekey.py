"""``dragent rekey``: after a KEK compromise, re-seal what a key version wrapped.

Every sealed object of a stream in one vault (segments ``streams/<s>/``, base backup
packs and manifests ``backups/<s>/``, artifacts packs ``artifacts/<s>/``) whose data key
is wrapped under the compromised KEK version is opened (verified completely: tags,
Merkle root, identity) and sealed again with the same records and the same header
fields (stream, epoch, seq, start, end, source times, creation time, frame size) under a
fresh data key from the current KEK. The record stream and its Merkle root are
unchanged, so every manifest that names the object (by key and root) still holds.

One object, in this order (docs/keys.md, "Re-keying"):

1. read it; an object whose key id is not the compromised version is skipped (already
   re-keyed: by an earlier run, or by this one before a crash; or another key's);
2. open it, seal the records anew, open the new bytes again and compare the root;
3. write the new bytes to ``rekey-tmp/<key>`` (without Object Lock), read them back,
   compare;
4. overwrite the original key (a PUT without ``If-None-Match``: the one exception to the
   vault's create-only rule besides ``vault verify --repair``), read it back, compare;
5. delete the temporary key (every version).

Progress is a small JSON state file under ``data_dir/rekey/``: the last key done (every
key before it is done), the counts, and the keys that failed (retried by the next run).
Objects run ``jobs`` at a time but the state only advances over a finished prefix, so
``kill -9`` and a rerun neither skip an object nor redo one: an object finished after the
saved key is found already re-keyed by its key id. A crash between steps 4 and 5 leaves
a temporary object, removed by the next run before it starts.

With Object Lock on the bucket, the overwrite makes a new (locked) version and the old
version, wrapped under the compromised key, stays until its own lock date: the report
counts them and gives their latest retain-until date. Once every stream is re-keyed,
revoke the version (``--revoke``, or ``dragent keys revoke``): the key provider then
refuses to unwrap anything under it, naming the version.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from replicators.errors import DragentError, IntegrityError, KeyAccessError, NotFound, StorageError
from replicators.keys import KeyProvider, unseal
from replicators.s3 import S3Store, classify, s3_client
from replicators.segment import OpenedSegment, SegmentHeader, read_header, seal
from replicators.store import ObjectStore

TMP_PREFIX = "rekey-tmp/"
_INLINE_SEAL = 256 << 10  # seal smaller objects on the loop; larger ones in a worker thread


def prefixes(stream: str) -> tuple[str, ...]:
    """Where a stream's sealed objects are, in key order (so one "last key" orders all)."""
    return tuple(sorted((f"artifacts/{stream}/", f"backups/{stream}/", f"streams/{stream}/")))


def state_path(data_dir: Path, vault: str, stream: str, from_version: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", from_version)[:80]
    digest = hashlib.sha256(from_version.encode()).hexdigest()[:8]
    return data_dir / "rekey" / f"{vault}-{stream}-{safe}-{digest}.json"


@dataclass
class RekeyState:
    """What a rekey of one stream has done, saved after every finished prefix of keys."""

    stream: str
    vault: str
    from_version: str
    last: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    locked_versions: int = 0
    locked_until: str | None = None  # the latest retain-until date of an old version
    complete: bool = False
    runs: int = 0

    @classmethod
    def load(cls, path: Path, stream: str, vault: str, from_version: str) -> RekeyState:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(stream, vault, from_version)
        state = cls(**doc)
        if (state.stream, state.vault, state.from_version) != (stream, vault, from_version):
            raise ValueError(f"{path} is the state of another rekey")
        return state

    def save(self, path: Path, *, durable: bool = False) -> None:
        """Replace the file atomically (a ``kill -9`` keeps the page cache: ``durable``
        fsyncs too, for the end of a run)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w") as f:
            json.dump(asdict(self), f, indent=1, sort_keys=True)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)


@dataclass
class RekeyReport:
    """One run's outcome (``counts``: this run; ``total``: every run of this rekey)."""

    stream: str
    vault: str
    from_version: str
    to_version: str
    seconds: float
    counts: dict[str, int]
    total: dict[str, int]
    failed: dict[str, str]
    complete: bool
    locked_versions: int
    locked_until: str | None
    resumed_after: str | None

    @property
    def rekeyed(self) -> int:
        return self.counts.get("rekeyed", 0)

    @property
    def per_second(self) -> float:
        return self.rekeyed / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"per_second": round(self.per_second, 1)}

    def lines(self) -> list[str]:
        c, t = self.counts, self.total
        out = [
            f"stream {self.stream} in vault {self.vault}: {self.from_version} -> {self.to_version}",
            f"  this run: {c.get('rekeyed', 0)} re-keyed, {c.get('already', 0)} already re-keyed, "
            f"{c.get('other_key', 0)} under another key, {c.get('not_sealed', 0)} not sealed, "
            f"{c.get('gone', 0)} gone, {c.get('failed', 0)} failed "
            f"in {self.seconds:.1f} s ({self.per_second:.1f} objects/s)",
            f"  all runs: {t.get('rekeyed', 0)} re-keyed"
            + (f", resumed after {self.resumed_after}" if self.resumed_after else ""),
        ]
        if self.locked_versions:
            out.append(
                f"  {self.locked_versions} old versions (under {self.from_version}) stay under "
                f"Object Lock until their lock dates, the last {self.locked_until}: "
                "they expire then (the GC and lifecycle rules cannot remove them earlier)"
            )
        for key, why in sorted(self.failed.items())[:20]:
            out.append(f"  FAILED {key}: {why}")
        out.append(
            "  complete: nothing left under the old version"
            if self.complete
            else "  NOT complete: rerun to continue (failed objects are retried)"
        )
        return out


class _LockProbe:
    """Reads the Object Lock retention of an object's current version (S3 only)."""

    def __init__(self, store: S3Store, client: Any) -> None:
        self.store, self.client = store, client

    async def get(self, key: str) -> tuple[bytes, dt.datetime | None]:
        """The object's bytes and its current version's retain-until date, in one GET."""
        try:
            out = await self.client.get_object(
                Bucket=self.store.cfg.bucket, Key=self.store.cfg.prefix + key
            )
            async with out["Body"] as body:
                data = bytes(await body.read())
        except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
            raise classify(exc, key) from exc
        until = out.get("ObjectLockRetainUntilDate")
        return data, until if isinstance(until, dt.datetime) else None


@contextlib.asynccontextmanager
async def _lock_probe(store: ObjectStore) -> AsyncIterator[_LockProbe | None]:
    """A probe when ``store`` is an S3 bucket with Object Lock enabled, else ``None``."""
    if not isinstance(store, S3Store):
        yield None
        return
    async with s3_client(store.cfg) as client:
        try:
            out = await client.get_object_lock_configuration(Bucket=store.cfg.bucket)
            enabled = out.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        except (ClientError, BotoCoreError):
            enabled = None
        yield _LockProbe(store, client) if enabled == "Enabled" else None


async def _put_temporary(store: ObjectStore, key: str, blob: bytes) -> None:
    if isinstance(store, S3Store):
        await store.put(key, blob, lock=False)
    else:
        await store.put(key, blob)


async def _remove(store: ObjectStore, key: str) -> None:
    if isinstance(store, S3Store):
        await store.purge(key)
    else:
        await store.delete(key)


class Rekeyer:
    """Re-keys one stream of one vault; ``run()`` returns the report."""

    def __init__(
        self,
        store: ObjectStore,
        keys: KeyProvider,
        stream: str,
        from_version: str,
        state_file: Path,
        *,
        vault: str,
        jobs: int = 8,
        progress: Callable[[int], None] | None = None,
        total: Callable[[int], None] | None = None,
    ) -> None:
        self.store, self.keys, self.stream = store, keys, stream
        self.from_version, self.state_file, self.vault = from_version, state_file, vault
        self.jobs = jobs
        self._progress = progress or (lambda n: None)
        self._total = total or (lambda n: None)
        self._probe: _LockProbe | None = None
        self._to_version = ""

    async def run(self) -> RekeyReport:
        """Re-key what is left; one run at a time per state file (``DragentError``)."""
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        with self.state_file.with_suffix(".lock").open("a") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DragentError(
                    f"another rekey of stream {self.stream} in vault {self.vault} is running "
                    f"(lock {lock.name})"
                ) from None
            return await self._run()

    async def _run(self) -> RekeyReport:
        state = RekeyState.load(self.state_file, self.stream, self.vault, self.from_version)
        resumed_after = state.last
        current = await self.keys.data_key()
        if current.key_id == self.from_version:
            raise KeyAccessError(
                f"the current key is {self.from_version}, the version to re-key away from",
                hint="rotate the key-encryption key first (dragent keys rotate FILE)",
            )
        self._to_version = current.key_id
        started = time.monotonic()
        state.runs += 1
        state.complete = False
        await self._clean_temporaries()
        todo = sorted(set(state.failed) | set(await self._keys_after(state.last)))
        self._total(len(todo))
        counts: dict[str, int] = {}
        async with _lock_probe(self.store) as probe:
            self._probe = probe
            await self._work(todo, state, counts)
        state.complete = not state.failed
        state.save(self.state_file, durable=True)
        return RekeyReport(
            stream=self.stream,
            vault=self.vault,
            from_version=self.from_version,
            to_version=self._to_version,
            seconds=time.monotonic() - started,
            counts=counts,
            total=dict(state.counts),
            failed=dict(state.failed),
            complete=state.complete,
            locked_versions=state.locked_versions,
            locked_until=state.locked_until,
            resumed_after=resumed_after,
        )

    async def _keys_after(self, last: str | None) -> list[str]:
        out: list[str] = []
        for prefix in prefixes(self.stream):
            if last is not None and last >= prefix and not last.startswith(prefix):
                continue  # every key of this prefix sorts before ``last``: done
            after = last if last is not None and last.startswith(prefix) else None
            out += [i.key async for i in self.store.list(prefix, start_after=after)]
        return out

    async def _clean_temporaries(self) -> None:
        for prefix in prefixes(self.stream):
            async for info in self.store.list(TMP_PREFIX + prefix):
                await _remove(self.store, info.key)

    async def _work(self, todo: list[str], state: RekeyState, counts: dict[str, int]) -> None:
        """Run ``todo`` ``jobs`` at a time; advance and save the state over the prefix of
        ``todo`` that is finished. A storage error (after botocore's retries) stops the run
        once the others in flight have finished: the state then names the last key done."""
        outcomes: dict[int, tuple[str, str | None, dt.datetime | None]] = {}
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(todo)):
            queue.put_nowait(i)
        committed = 0
        stop: list[BaseException] = []

        def commit() -> None:
            nonlocal committed
            moved = False
            while committed in outcomes:
                key = todo[committed]
                outcome, why, until = outcomes.pop(committed)
                counts[outcome] = counts.get(outcome, 0) + 1
                if outcome != "failed":  # an earlier run's failure retried: now counted once
                    state.counts[outcome] = state.counts.get(outcome, 0) + 1
                    state.failed.pop(key, None)
                else:
                    state.failed[key] = why or "failed"
                if until is not None:
                    state.locked_versions += 1
                    iso = until.astimezone(dt.UTC).isoformat()
                    state.locked_until = max(state.locked_until or iso, iso)
                if state.last is None or key > state.last:
                    state.last = key
                committed += 1
                moved = True
            if moved:
                state.save(self.state_file)

        async def worker() -> None:
            while not stop:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    outcomes[i] = await self._one(todo[i])
                except StorageError as exc:
                    stop.append(exc)
                    return
                commit()
                self._progress(1)

        await asyncio.gather(*(worker() for _ in range(max(1, self.jobs))))
        commit()
        if stop:
            state.save(self.state_file, durable=True)
            raise stop[0]

    async def _one(self, key: str) -> tuple[str, str | None, dt.datetime | None]:
        """Re-key one object: ``(outcome, why it failed, retain-until of the old version
        if it stays locked)``. Raises ``StorageError`` when the store cannot be used."""
        try:
            if self._probe is not None:
                blob, until = await self._probe.get(key)
            else:
                blob, until = await self.store.get(key), None
        except NotFound:
            return "gone", None, None
        try:
            header = read_header(blob)
        except IntegrityError:
            return "not_sealed", None, None
        if header.key_id != self.from_version:
            return ("already" if header.key_id == self._to_version else "other_key"), None, None
        try:
            opened = await _open(blob, header, self.keys)
            new = await self._reseal(opened)
        except (IntegrityError, KeyAccessError) as exc:
            return "failed", str(exc), None
        tmp = TMP_PREFIX + key
        await _put_temporary(self.store, tmp, new)
        if await self.store.get(tmp) != new:
            await _remove(self.store, tmp)
            return "failed", "the temporary copy read back differs from what was written", None
        await self.store.put(key, new)  # the overwrite: create-only does not apply here
        if await self.store.get(key) != new:
            return "failed", "the object read back after the overwrite differs", None
        await _remove(self.store, tmp)
        locked = until if until is not None and until > dt.datetime.now(dt.UTC) else None
        return "rekeyed", None, locked

    async def _reseal(self, opened: OpenedSegment) -> bytes:
        h = opened.header
        data_key = await self.keys.data_key()
        if data_key.key_id == self.from_version:
            raise KeyAccessError(f"the current key became {self.from_version} again")
        self._to_version = data_key.key_id

        def build() -> bytes:
            return seal(
                opened.records,
                stream=h.stream,
                epoch=h.epoch,
                seq=h.seq,
                start=h.start,
                end=h.end,
                first_source_time=h.first_source_time,
                last_source_time=h.last_source_time,
                data_key=data_key,
                created_at=h.created_at,
                frame_size=h.frame_size,
            )

        size = sum(map(len, opened.records))
        new = build() if size <= _INLINE_SEAL else await asyncio.to_thread(build)
        again = await _open(new, h, self.keys)
        if again.root != opened.root or again.header.record_count != h.record_count:
            raise IntegrityError(
                "the re-sealed object does not hold the same records", where=h.where
            )
        if again.header.key_id != data_key.key_id:
            raise IntegrityError("the re-sealed object names another key", where=h.where)
        return new


async def _open(blob: bytes, header: SegmentHeader, keys: KeyProvider) -> OpenedSegment:
    return await unseal(
        blob, keys, expect_stream=header.stream, expect_epoch=header.epoch, expect_seq=header.seq
    )
