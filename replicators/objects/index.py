"""The source's record of what is durable in the destination, per key (SQLite).

One row per key last shipped as present: etag, size, LastModified (ns),
content hash, a fingerprint of its content type and user metadata, and when
that state was read. Rows change only on ``ack`` (and ``confirm``), so after a
crash the index says exactly what the vault holds, and the scan re-captures
every key that differs.

Why ``checked_ns``: S3 listings give LastModified to the second, so a key
rewritten within the same second with the same bytes and other metadata
lists exactly as before. A state read at least ``SETTLE_NS`` after its
LastModified second began is *settled*: no later write can list the same.
The scan re-reads keys whose shipped state is not settled (see ``settled``).

The index also keeps the source's persisted Merkle key tree (``replicators.objects.trees``,
tables ``tree_*`` in the same file), updated in the same transaction as its rows: the
tree is exactly what is durable in the destination. An index written before the tree
existed gets it built from its rows when opened.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from replicators.objects.trees import Row, TreeStore

SETTLE_NS = 2_000_000_000
"""One second of LastModified resolution plus one second allowed for the clock
difference between this host and the object store."""

COLUMNS = "key, etag, size, time_ns, hash, meta, checked_ns"

LOGGED = "(in the log)"
"""The etag of a row learned from the destination's log (a partition taken from another
agent, a segment found durable but never acknowledged): the state is durable there, its
etag unknown. Never a real etag, so the scan reads the key again; the source then skips
it if its content is the logged one (``ObjectsSource._same_content``). A row whose etag is
empty is only *in doubt* (maybe not durable) and is always shipped again."""


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    etag: str
    size: int
    time_ns: int
    content_hash: str
    meta: str = ""
    """Fingerprint of the content type and user metadata (``records.meta_fingerprint``)."""
    checked_ns: int = 0
    """Wall-clock time (ns) just before the read that saw this state."""

    @property
    def settled(self) -> bool:
        """True when no later write in the same LastModified second can hide behind it."""
        return settled(self.time_ns, self.checked_ns)


def settled(time_ns: int, checked_ns: int) -> bool:
    return checked_ns >= time_ns + SETTLE_NS


class ShippedIndex:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One user at a time (the source's task), possibly from a worker thread.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS shipped (key TEXT PRIMARY KEY, etag TEXT, size INTEGER,"
            " time_ns INTEGER, hash TEXT, meta TEXT NOT NULL DEFAULT '',"
            " checked_ns INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID"
        )
        have = {row[1] for row in self._db.execute("PRAGMA table_info(shipped)")}
        if "meta" not in have:  # an index written before these columns existed
            self._db.execute("ALTER TABLE shipped ADD COLUMN meta TEXT NOT NULL DEFAULT ''")
        if "checked_ns" not in have:
            self._db.execute("ALTER TABLE shipped ADD COLUMN checked_ns INTEGER NOT NULL DEFAULT 0")
        self.tree = TreeStore(path, db=self._db)
        if self.tree.built_at is None:
            self.rebuild_tree()

    def rebuild_tree(self) -> None:
        """Rebuild the key tree from the index's rows (its drift check: cheap, local)."""
        rows = self._db.execute("SELECT key, size, hash, etag FROM shipped").fetchall()
        self.tree.rebuild(
            ((key, Row(size, digest, etag or "")) for key, size, digest, etag in rows),
            "shipped index",
        )

    def get(self, key: str) -> Entry | None:
        row = self._db.execute(f"SELECT {COLUMNS} FROM shipped WHERE key = ?", (key,)).fetchone()
        return Entry(*row) if row else None

    def between(self, after: str | None, upto: str | None) -> list[Entry]:
        """Entries with ``after < key <= upto`` (open ends when None), in key order."""
        sql = f"SELECT {COLUMNS} FROM shipped WHERE 1=1"
        args: list[str] = []
        if after is not None:
            sql, args = sql + " AND key > ?", [*args, after]
        if upto is not None:
            sql, args = sql + " AND key <= ?", [*args, upto]
        return [Entry(*r) for r in self._db.execute(sql + " ORDER BY key", args)]

    def commit(
        self, changes: Iterable[tuple[str, Entry | None]], confirmed: Iterable[Entry] = ()
    ) -> None:
        """Apply (key, entry or None for deleted) and ``confirmed`` in one transaction.

        A confirmed entry only moves its row's ``checked_ns`` forward, and only if the
        row still holds that same state (a newer ack may have replaced it meanwhile).
        """
        with self._db:
            self._db.execute("BEGIN")
            changes = list(changes)
            self.tree.apply_in(
                (key, None if e is None else Row(e.size, e.content_hash, e.etag))
                for key, e in changes
            )
            for key, entry in changes:
                if entry is None:
                    self._db.execute("DELETE FROM shipped WHERE key = ?", (key,))
                else:
                    self._db.execute(
                        f"INSERT OR REPLACE INTO shipped ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            key,
                            entry.etag,
                            entry.size,
                            entry.time_ns,
                            entry.content_hash,
                            entry.meta,
                            entry.checked_ns,
                        ),
                    )
            for e in confirmed:
                self._db.execute(
                    "UPDATE shipped SET checked_ns = max(checked_ns, ?) WHERE key = ?"
                    " AND etag = ? AND size = ? AND time_ns = ? AND meta = ?",
                    (e.checked_ns, e.key, e.etag, e.size, e.time_ns, e.meta),
                )

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM shipped").fetchone()[0])

    def close(self) -> None:
        self._db.close()
