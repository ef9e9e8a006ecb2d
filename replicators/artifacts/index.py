"""The source's record of what one destination vault holds (a SQLite file per peer).

Tables:

- ``packs(key, state, size, created)``: every pack this source wrote to the
  destination. ``state`` is ``uploading`` from just before the PUT until the
  PUT succeeded, then ``done``. After a crash an ``uploading`` pack is looked
  up in the vault: present means done, absent means forgotten (its chunks
  will be packed again). So a chunk whose pack was published is never sent
  twice, even after kill -9 between the PUT and the bookkeeping.
- ``chunks(id, pack, record, length)``: where each chunk lives (only chunks of
  ``done`` packs count as present at the destination).
- ``records(position, model, version, fingerprint, root)``: manifest records
  handed to the shipper, by stream position. ``resume(p)`` drops those at or
  after ``p`` (not durable: they will be handed out again).

Synchronous and quick (indexed lookups, one transaction per pack); the
source calls it from the event loop.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packs (
    key TEXT PRIMARY KEY, state TEXT NOT NULL, size INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB PRIMARY KEY, pack TEXT NOT NULL, record INTEGER NOT NULL, length INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_pack ON chunks(pack);
CREATE TABLE IF NOT EXISTS records (
    position INTEGER PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL,
    fingerprint TEXT NOT NULL, root TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS records_version ON records(model, version);
"""


class SourceIndex:
    """One destination's chunk index and manifest journal. Not shared between processes."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9) whole; a power loss may drop the
        # last transactions, which only makes the index claim less than the vault holds.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        if self._meta("writer") is None:
            with self._tx():
                self._db.execute("INSERT INTO meta VALUES ('writer', ?)", (secrets.token_hex(4),))
                self._db.execute("INSERT INTO meta VALUES ('next_pack', '1')")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _meta(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    @property
    def writer(self) -> str:
        value = self._meta("writer")
        assert value is not None
        return value

    def next_pack_seq(self) -> int:
        """Allocate a pack number (never reused, even when the pack is never published)."""
        with self._tx() as db:
            seq = int(self._meta("next_pack") or "1")
            db.execute("UPDATE meta SET value = ? WHERE name = 'next_pack'", (str(seq + 1),))
        return seq

    # -- chunks and packs ------------------------------------------------------------------

    def lookup(self, chunk: bytes) -> tuple[str, int] | None:
        """Where the destination already holds ``chunk`` (a published pack), or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT c.pack, c.record FROM chunks c JOIN packs p ON p.key = c.pack "
                "WHERE c.id = ? AND p.state = 'done'",
                (chunk,),
            ).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    def begin_pack(self, key: str, chunks: list[tuple[bytes, int]]) -> None:
        """Record the intent to publish ``key`` holding ``chunks`` ([(id, length)], in order)."""
        with self._tx() as db:
            db.execute("INSERT INTO packs VALUES (?, 'uploading', 0, ?)", (key, time.time()))
            db.executemany(
                "INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?)",
                [(cid, key, i, length) for i, (cid, length) in enumerate(chunks)],
            )

    def pack_done(self, key: str, size: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE packs SET state = 'done', size = ? WHERE key = ?", (size, key))

    def forget_pack(self, key: str) -> None:
        """The pack was never published: its chunks are not at the destination."""
        with self._tx() as db:
            db.execute("DELETE FROM chunks WHERE pack = ?", (key,))
            db.execute("DELETE FROM packs WHERE key = ?", (key,))

    def uploading(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT key FROM packs WHERE state = 'uploading'").fetchall()
        return [str(r[0]) for r in rows]

    def adopt(self, key: str, size: int, chunks: list[tuple[bytes, int, int]]) -> None:
        """Record a pack found in the destination (rebuilding a lost index)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO packs VALUES (?, 'done', ?, ?)", (key, size, time.time())
            )
            db.executemany(
                "INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?)",
                [(cid, key, rec, length) for cid, rec, length in chunks],
            )

    def pack_created(self, key: str) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT created FROM packs WHERE key = ?", (key,)).fetchone()
        return None if row is None else float(row[0])

    # -- garbage collection guard ------------------------------------------------------------

    def begin_upload(self) -> None:
        """An upload may now reference any chunk in the index (GC must wait). Every upload
        also bumps ``generation``, so a collection planned before it is refused."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('upload', ?)", (str(time.time()),))
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('generation', ?)",
                (str(self.generation() + 1),),
            )

    def generation(self) -> int:
        return int(self._meta("generation") or "0")

    def end_upload(self) -> None:
        """Every manifest handed out is durable and no version is being shipped."""
        with self._tx() as db:
            db.execute("DELETE FROM meta WHERE name = 'upload'")

    def upload_in_progress(self) -> bool:
        with self._lock:
            return self._meta("upload") is not None

    def condemn(self, keys: list[str], generation: int) -> bool:
        """Forget ``keys`` before they are deleted, unless an upload is in progress or one
        began since ``generation`` was read (then nothing changes and False is returned).
        After this no lookup returns their chunks, so no new manifest can reference them."""
        with self._tx() as db:
            if self._meta("upload") is not None or self.generation() != generation:
                return False
            for key in keys:
                db.execute("DELETE FROM chunks WHERE pack = ?", (key,))
                db.execute("DELETE FROM packs WHERE key = ?", (key,))
        return True

    def empty(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM packs LIMIT 1").fetchone() is None

    # -- manifest records --------------------------------------------------------------------

    def resume(self, position: int) -> None:
        """Forget records at or after ``position``: they are not durable."""
        with self._tx() as db:
            db.execute("DELETE FROM records WHERE position >= ?", (position,))

    def add_record(
        self, position: int, model: str, version: str, fingerprint: str, root: str
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?)",
                (position, model, version, fingerprint, root),
            )

    def add_adopted(self, model: str, version: str, fingerprint: str, root: str) -> None:
        """Record a version the destination already holds (no stream position of its own)."""
        with self._tx() as db:
            row = db.execute("SELECT MIN(position) FROM records").fetchone()
            position = min(0, int(row[0] or 0)) - 1
            db.execute(
                "INSERT INTO records VALUES (?, ?, ?, ?, ?)",
                (position, model, version, fingerprint, root),
            )

    def shipped(self) -> dict[tuple[str, str], tuple[str, str]]:
        """``{(model, version): (fingerprint, root)}`` of the latest record of each version."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model, version, fingerprint, root FROM records ORDER BY position"
            ).fetchall()
        return {(str(m), str(v)): (str(f), str(r)) for m, v, f, r in rows}
