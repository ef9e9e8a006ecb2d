"""The source's record of what is durable in the destination, per key (SQLite).

One row per key last shipped as present: etag, size, LastModified (ns) and
content hash. Rows change only on ``ack``, so after a crash the index says
exactly what the vault holds, and the scan re-captures every key that differs.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    etag: str
    size: int
    time_ns: int
    content_hash: str


class ShippedIndex:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One user at a time (the source's task), possibly from a worker thread.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS shipped (key TEXT PRIMARY KEY, etag TEXT, size INTEGER,"
            " time_ns INTEGER, hash TEXT) WITHOUT ROWID"
        )

    def get(self, key: str) -> Entry | None:
        row = self._db.execute(
            "SELECT key, etag, size, time_ns, hash FROM shipped WHERE key = ?", (key,)
        ).fetchone()
        return Entry(*row) if row else None

    def between(self, after: str | None, upto: str | None) -> list[Entry]:
        """Entries with ``after < key <= upto`` (open ends when None), in key order."""
        sql = "SELECT key, etag, size, time_ns, hash FROM shipped WHERE 1=1"
        args: list[str] = []
        if after is not None:
            sql, args = sql + " AND key > ?", [*args, after]
        if upto is not None:
            sql, args = sql + " AND key <= ?", [*args, upto]
        return [Entry(*r) for r in self._db.execute(sql + " ORDER BY key", args)]

    def commit(self, changes: Iterable[tuple[str, Entry | None]]) -> None:
        """Apply (key, entry or None for deleted) in one transaction."""
        with self._db:
            self._db.execute("BEGIN")
            for key, entry in changes:
                if entry is None:
                    self._db.execute("DELETE FROM shipped WHERE key = ?", (key,))
                else:
                    self._db.execute(
                        "INSERT OR REPLACE INTO shipped VALUES (?, ?, ?, ?, ?)",
                        (key, entry.etag, entry.size, entry.time_ns, entry.content_hash),
                    )

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM shipped").fetchone()[0])

    def close(self) -> None:
        self._db.close()
