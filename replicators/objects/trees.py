"""Persisted Merkle key trees, per partition, kept up to date from the change stream (SQLite).

The tree is the same as ``verifiers.objects.KeyTree`` (the same roots, node for node): a
binary Merkle tree of depth ``DEPTH`` over ``2**DEPTH`` hash buckets; a key falls in the
bucket given by the top ``DEPTH`` bits of ``xxh3_64(key)``; a key's leaf is
``key_leaf(key, size, content hash)``; a bucket's node is the leaf hash of (sum of its
leaves mod 2**128, count); an inner node is ``node_hash(left, right)`` with an empty
subtree as ``None`` (zeros in its parent, ``None`` when both children are).

A *partition* is the subtree under one node of level ``log2(partitions)``: partition ``p``
covers the contiguous hash buckets ``p * 2**(DEPTH - log2(partitions))`` onwards, that is
the keys whose hash starts with the bits of ``p`` (the same cut as the key-hash ranges the
agents of a region share). What is stored:

- ``tree_keys``: one row per key (bucket, key, size, content hash, etag, version), keyed
  by (bucket, key), so one bucket's keys are one range read;
- ``tree_buckets``: per non-empty bucket, the sum of its leaves, its count and its node;
- ``tree_parts``: per partition, its root and whether it is stale (a bucket under it
  changed since); ``root()`` recomputes the stale ones from their 2**(DEPTH-log2 P)
  bucket nodes and the few nodes above the partitions;
- ``tree_meta``: depth, partitions, ``built_at`` (the last full rebuild), ``updated_at``
  (the last change), ``built_from``.

A put or delete costs a handful of row writes (O(1)); a root costs the stale partitions;
any node is computed from at most one partition's bucket nodes; a verify of two trees
that differ in ``k`` keys reads the partition roots, then only the ``k`` partitions and
buckets that differ (``verifiers.objects.compare`` works on these trees as on in-memory
ones). Nothing is loaded whole into memory.

The tables may live in their own file or beside other tables in a caller's database (the
shipping index keeps the source's tree in ``shipped.sqlite`` and updates it in the same
transaction as its own rows, so the tree says exactly what the index says).

A full rebuild (``begin_rebuild`` … ``finish``) writes into shadow tables, in small
transactions, while changes go on being applied; changes made meanwhile are journaled
and replayed over the rebuilt rows when it finishes, which swaps the tables in one short
transaction. It catches drift (changes the stream never told the tree of).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import xxhash

from replicators.errors import IntegrityError
from replicators.objects import records as rec
from replicators.partitions import partition_of
from verifiers.merkle import HASH_SIZE, leaf_hash, node_hash

DEPTH = 16
PARTITIONS = 64
MIRROR_TREE = "tree.sqlite"
"""The mirror's tree, in the passive side's target directory (``StreamPaths.target``)."""
_MOD = 1 << 128
_ZERO = b"\x00" * HASH_SIZE


def key_bucket(key: str, depth: int = DEPTH) -> int:
    return xxhash.xxh3_64_intdigest(key.encode()) >> (64 - depth)


def hash_bytes(content_hash: str) -> bytes:
    """A content hash (hex) as bytes; text that is not hex (a damaged index, foreign
    metadata) as its own xxh3-128, so it still has a leaf, unlike any real hash."""
    try:
        return bytes.fromhex(content_hash)
    except ValueError:
        return xxhash.xxh3_128_digest(content_hash.encode())


def key_leaf(key: str, size: int, content_hash: str) -> bytes:
    return leaf_hash(key.encode() + b"\x00" + size.to_bytes(8, "big") + hash_bytes(content_hash))


def bucket_node(total: int, count: int) -> bytes:
    return leaf_hash(total.to_bytes(16, "big") + count.to_bytes(8, "big"))


def partition_bits(partitions: int, depth: int = DEPTH) -> int:
    """log2(partitions); raises ValueError unless a power of two from 1 to 2**depth."""
    bits = partitions.bit_length() - 1
    if partitions < 1 or 1 << bits != partitions or bits > depth:
        raise ValueError(f"partitions must be a power of two from 1 to {1 << depth}")
    return bits


def partition_of_key(key: str, partitions: int = PARTITIONS, depth: int = DEPTH) -> int:
    """The partition of ``key``: the top log2(partitions) bits of its hash, the same cut
    a partitioned stream's logs use (``replicators.partitions``)."""
    partition_bits(partitions, depth)  # the tree's own bound: at most one per bucket
    return partition_of(key, partitions)


def parents(nodes: dict[int, bytes], low: int, high: int) -> dict[int, bytes]:
    """The heap-indexed nodes of the level above heap indices ``low..high`` (inclusive, one
    level, ``low`` even), from ``nodes`` (absent = empty subtree); added to ``nodes``."""
    out = {}
    for i in range(low >> 1, (high >> 1) + 1):
        left, right = nodes.get(2 * i), nodes.get(2 * i + 1)
        if left is not None or right is not None:
            out[i] = node_hash(left or _ZERO, right or _ZERO)
    nodes.update(out)
    return out


def subtree(leaves: dict[int, bytes], low: int, high: int, top: int) -> dict[int, bytes]:
    """Every node from heap indices ``low..high`` (one level) up to heap index ``top``."""
    nodes = dict(leaves)
    while low > top:
        parents(nodes, low, high)
        low, high = low >> 1, high >> 1
    return nodes


class Row(NamedTuple):
    size: int
    content_hash: str
    etag: str = ""
    version: tuple[int, int] = (0, 0)


class Gone(NamedTuple):
    """A delete at ``version`` (for ``apply_in(versioned=True)``; otherwise as None)."""

    version: tuple[int, int]


SCHEMA = """
CREATE TABLE IF NOT EXISTS tree_meta (name TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS tree_keys (bucket INTEGER NOT NULL, key TEXT NOT NULL,
  size INTEGER NOT NULL, hash BLOB NOT NULL, etag TEXT NOT NULL DEFAULT '',
  vtime INTEGER NOT NULL DEFAULT 0, vseq INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (bucket, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tree_buckets (bucket INTEGER PRIMARY KEY, total BLOB NOT NULL,
  count INTEGER NOT NULL, node BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tree_parts (part INTEGER PRIMARY KEY, root BLOB,
  stale INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS tree_journal (n INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL,
  size INTEGER, hash BLOB, etag TEXT, vtime INTEGER, vseq INTEGER);
"""


class TreeStore:
    """One persisted key tree (see the module docstring).

    ``TreeStore(path)`` opens (or creates) its own database; ``TreeStore(path, db=conn)``
    keeps its tables in ``conn`` and leaves transactions to the caller for ``apply_in``.
    One writer at a time per process; other processes may read and write (WAL, a busy
    timeout). Raises ``ValueError`` if the stored tree has another depth or partition count.
    """

    def __init__(
        self,
        path: Path,
        *,
        partitions: int = PARTITIONS,
        depth: int = DEPTH,
        db: sqlite3.Connection | None = None,
    ) -> None:
        self.path = path
        self.depth = depth
        self._bits = partition_bits(partitions, depth)
        self.partitions = partitions
        self._own = db is None
        if db is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=60000")  # another process may be creating it
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=60000")
        self._db = db
        self._db.executescript(SCHEMA)
        meta = self._meta()
        if "depth" not in meta:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._set_meta(depth=str(depth), partitions=str(partitions))
        elif (int(meta["depth"]), int(meta["partitions"])) != (depth, partitions):
            raise ValueError(
                f"{path}: a tree of depth {meta['depth']} and {meta['partitions']} partitions, "
                f"not {depth} and {partitions}"
            )
        self._cache: dict[int, dict[int, bytes]] = {}
        self._top: dict[int, bytes] | None = None

    # -- reading -----------------------------------------------------------------

    def _meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT name, value FROM tree_meta"))

    def _set_meta(self, **values: str) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO tree_meta (name, value) VALUES (?, ?)", values.items()
        )

    @property
    def built_at(self) -> float | None:
        """When the last full rebuild finished (None: never rebuilt, not to be trusted)."""
        value = self._meta().get("built_at")
        return float(value) if value else None

    @property
    def updated_at(self) -> float | None:
        value = self._meta().get("updated_at")
        return float(value) if value else None

    def info(self) -> dict[str, Any]:
        meta = self._meta()
        return {
            "path": str(self.path),
            "depth": self.depth,
            "partitions": self.partitions,
            "built_at": float(meta["built_at"]) if meta.get("built_at") else None,
            "built_from": meta.get("built_from", ""),
            "updated_at": float(meta["updated_at"]) if meta.get("updated_at") else None,
            "keys": len(self),
        }

    def bucket(self, key: str) -> int:
        return key_bucket(key, self.depth)

    def partition(self, bucket: int) -> int:
        return bucket >> (self.depth - self._bits)

    def partition_range(self, part: int) -> range:
        """The hash buckets of partition ``part``: a contiguous range."""
        width = 1 << (self.depth - self._bits)
        return range(part * width, (part + 1) * width)

    def get(self, key: str) -> Row | None:
        row = self._db.execute(
            "SELECT size, hash, etag, vtime, vseq FROM tree_keys WHERE bucket = ? AND key = ?",
            (self.bucket(key), key),
        ).fetchone()
        return Row(row[0], row[1].hex(), row[2], (row[3], row[4])) if row else None

    def leaves(self, bucket: int) -> dict[str, bytes]:
        """The keys of one hash bucket and their leaves."""
        return {
            key: key_leaf(key, size, digest.hex())
            for key, size, digest in self._db.execute(
                "SELECT key, size, hash FROM tree_keys WHERE bucket = ?", (bucket,)
            )
        }

    def __len__(self) -> int:
        return int(
            self._db.execute("SELECT coalesce(sum(count), 0) FROM tree_buckets").fetchone()[0]
        )

    def root(self) -> bytes:
        """The root (zeros for an empty tree), stale partitions recomputed first."""
        return self.node(1) or _ZERO

    def node_at(self, level: int, index: int) -> bytes | None:
        """The node at ``level`` (0: the root; ``depth``: the buckets), ``index`` from the left."""
        return self.node((1 << level) + index)

    def node(self, index: int) -> bytes | None:
        """Heap-indexed node (1 is the root); None for an empty subtree."""
        level = index.bit_length() - 1
        if level <= self._bits:
            if self._top is None:
                self._top = self._compute_top()
            return self._top.get(index)
        part = (index >> (level - self._bits)) - self.partitions
        nodes = self._cache.get(part)
        if nodes is None:
            nodes = self._cache[part] = self._partition_nodes(part)[0]
        return nodes.get(index)

    def partition_roots(self) -> dict[int, bytes]:
        """Partition → root, for the non-empty partitions (stale ones recomputed)."""
        self._refresh()
        return {p: root for p, root in self._db.execute(
            "SELECT part, root FROM tree_parts WHERE root IS NOT NULL")}  # fmt: skip

    def _partition_nodes(self, part: int) -> tuple[dict[int, bytes], bytes | None]:
        span = self.partition_range(part)
        base = 1 << self.depth
        leaves = {
            base + b: node
            for b, node in self._db.execute(
                "SELECT bucket, node FROM tree_buckets WHERE bucket >= ? AND bucket < ?",
                (span.start, span.stop),
            )
        }
        top = self.partitions + part
        nodes = subtree(leaves, base + span.start, base + span.stop - 1, top)
        return nodes, nodes.get(top)

    def _refresh(self) -> None:
        """Recompute and store the roots of stale partitions (one short transaction)."""
        stale = [p for (p,) in self._db.execute("SELECT part FROM tree_parts WHERE stale = 1")]
        if not stale:
            return
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")  # no change slips between reading and storing
            stale = [p for (p,) in self._db.execute("SELECT part FROM tree_parts WHERE stale = 1")]
            for p in stale:
                nodes, root = self._partition_nodes(p)
                self._cache[p] = nodes
                self._db.execute(
                    "UPDATE tree_parts SET root = ?, stale = 0 WHERE part = ?", (root, p)
                )

    def _compute_top(self) -> dict[int, bytes]:
        roots = {self.partitions + p: r for p, r in self.partition_roots().items()}
        return subtree(roots, self.partitions, 2 * self.partitions - 1, 1)

    # -- writing ---------------------------------------------------------------------

    def apply(self, changes: Iterable[tuple[str, Row | None]]) -> None:
        """Put (key, Row) or delete (key, None) in one transaction."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self.apply_in(changes)

    def put(self, key: str, size: int, content_hash: str, etag: str = "") -> None:
        self.apply([(key, Row(size, content_hash, etag))])

    def remove(self, key: str) -> None:
        self.apply([(key, None)])

    def apply_in(
        self, changes: Iterable[tuple[str, Row | Gone | None]], *, versioned: bool = False
    ) -> int:
        """``apply`` within the caller's transaction. With ``versioned``, a change older than
        the version the key holds is skipped (a re-applied segment). Returns rows changed."""
        deltas: dict[int, tuple[int, int]] = {}
        rebuilding = self._meta().get("rebuilding") == "1"
        changed = 0
        for key, row in changes:
            b = self.bucket(key)
            old = self._db.execute(
                "SELECT size, hash, vtime, vseq FROM tree_keys WHERE bucket = ? AND key = ?",
                (b, key),
            ).fetchone()
            if isinstance(row, Gone):
                if versioned and old is not None and row.version < old[2:]:
                    continue
                row = None
            elif versioned and old is not None and row is not None and row.version < old[2:]:
                continue
            if rebuilding:
                self._journal(key, row)
            add, count = deltas.get(b, (0, 0))
            if old is not None:
                add -= int.from_bytes(key_leaf(key, old[0], old[1].hex()), "big")
                count -= 1
            if row is None:
                if old is None:
                    continue
                self._db.execute("DELETE FROM tree_keys WHERE bucket = ? AND key = ?", (b, key))
            else:
                digest = hash_bytes(row.content_hash or "0" * 32)
                add += int.from_bytes(key_leaf(key, row.size, digest.hex()), "big")
                count += 1
                self._db.execute(
                    "INSERT OR REPLACE INTO tree_keys (bucket, key, size, hash, etag, vtime, vseq)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (b, key, row.size, digest, row.etag, *row.version),
                )
            deltas[b] = (add, count)
            changed += 1
        self._add_to_buckets(deltas)
        if changed:
            self._set_meta(updated_at=repr(time.time()))
        return changed

    def _journal(self, key: str, row: Row | None) -> None:
        values = (
            (row.size, hash_bytes(row.content_hash or "0" * 32), row.etag, *row.version)
            if row is not None
            else (None, None, None, None, None)
        )
        self._db.execute(
            "INSERT INTO tree_journal (key, size, hash, etag, vtime, vseq)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key, *values),
        )

    def _add_to_buckets(
        self, deltas: dict[int, tuple[int, int]], table: str = "tree_buckets"
    ) -> None:
        parts = set()
        for b, (add, count) in deltas.items():
            row = self._db.execute(
                f"SELECT total, count FROM {table} WHERE bucket = ?", (b,)
            ).fetchone()
            total = (int.from_bytes(row[0], "big") if row else 0) + add
            n = (row[1] if row else 0) + count
            if n <= 0:
                self._db.execute(f"DELETE FROM {table} WHERE bucket = ?", (b,))
            else:
                total %= _MOD
                self._db.execute(
                    f"INSERT OR REPLACE INTO {table} (bucket, total, count, node)"
                    " VALUES (?, ?, ?, ?)",
                    (b, total.to_bytes(16, "big"), n, bucket_node(total, n)),
                )
            parts.add(self.partition(b))
        if table == "tree_buckets" and parts:
            self._db.executemany(
                "INSERT INTO tree_parts (part, stale) VALUES (?, 1)"
                " ON CONFLICT (part) DO UPDATE SET stale = 1",
                [(p,) for p in parts],
            )
            for p in parts:
                self._cache.pop(p, None)
            self._top = None

    # -- full rebuild ------------------------------------------------------------------

    def begin_rebuild(self) -> Rebuild:
        """Start a full rebuild (see the module docstring); changes applied meanwhile are
        journaled and replayed when it finishes."""
        return Rebuild(self)

    def rebuild(self, rows: Iterable[tuple[str, Row]], built_from: str = "") -> None:
        """Replace the whole tree by ``rows`` (key, Row): ``begin_rebuild``, add, finish."""
        build = self.begin_rebuild()
        batch: list[tuple[str, Row]] = []
        for item in rows:
            batch.append(item)
            if len(batch) >= 20_000:
                build.add(batch)
                batch = []
        build.add(batch)
        build.finish(built_from)

    def distrust(self) -> None:
        """Mark the tree as not to be trusted until the next full rebuild (``built_at``
        cleared): a change it should have been told of may be missing."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._set_meta(built_at="")

    def close(self) -> None:
        if self._own:
            self._db.close()


class Rebuild:
    """A full rebuild under way: ``add`` rows (any order, each key once), then ``finish``."""

    def __init__(self, store: TreeStore) -> None:
        self.store = store
        db = store._db
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DROP TABLE IF EXISTS tree_keys_new")
            db.execute(
                "CREATE TABLE tree_keys_new (bucket INTEGER NOT NULL, key TEXT NOT NULL,"
                " size INTEGER NOT NULL, hash BLOB NOT NULL, etag TEXT NOT NULL DEFAULT '',"
                " vtime INTEGER NOT NULL DEFAULT 0, vseq INTEGER NOT NULL DEFAULT 0,"
                " PRIMARY KEY (bucket, key)) WITHOUT ROWID"
            )
            db.execute("DELETE FROM tree_journal")
            store._set_meta(rebuilding="1")
        self._sums: dict[int, int] = {}
        self._counts: dict[int, int] = {}

    def add(self, rows: Sequence[tuple[str, Row]]) -> None:
        """Add one batch of rows (one short transaction)."""
        store, sums, counts = self.store, self._sums, self._counts
        values = []
        for key, row in rows:
            b = store.bucket(key)
            digest = row.content_hash or "0" * 32
            sums[b] = sums.get(b, 0) + int.from_bytes(key_leaf(key, row.size, digest), "big")
            counts[b] = counts.get(b, 0) + 1
            values.append((b, key, row.size, hash_bytes(digest), row.etag, *row.version))
        with store._db:
            store._db.execute("BEGIN IMMEDIATE")
            store._db.executemany(
                "INSERT INTO tree_keys_new (bucket, key, size, hash, etag, vtime, vseq)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                values,
            )

    def finish(self, built_from: str = "") -> None:
        """Swap the rebuilt rows in, replay the journal over them, mark every partition stale."""
        store, db = self.store, self.store._db
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DROP TABLE tree_keys")
            db.execute("ALTER TABLE tree_keys_new RENAME TO tree_keys")
            db.execute("DELETE FROM tree_buckets")
            db.executemany(
                "INSERT INTO tree_buckets (bucket, total, count, node) VALUES (?, ?, ?, ?)",
                (
                    (b, (s % _MOD).to_bytes(16, "big"), self._counts[b],
                     bucket_node(s % _MOD, self._counts[b]))
                    for b, s in self._sums.items()
                ),
            )  # fmt: skip
            db.execute("DELETE FROM tree_parts")
            db.executemany(
                "INSERT INTO tree_parts (part, stale) VALUES (?, 1)",
                [(p,) for p in range(store.partitions)],
            )
            store._set_meta(rebuilding="0")
            journal = [
                (key, None if size is None else Row(size, digest.hex(), etag, (vtime, vseq)))
                for key, size, digest, etag, vtime, vseq in db.execute(
                    "SELECT key, size, hash, etag, vtime, vseq FROM tree_journal ORDER BY n"
                )
            ]
            db.execute("DELETE FROM tree_journal")
            store._cache.clear()
            store._top = None
            store.apply_in(journal)
            now = repr(time.time())
            store._set_meta(built_at=now, updated_at=now, built_from=built_from)
        store._refresh()

    def abort(self) -> None:
        db = self.store._db
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DROP TABLE IF EXISTS tree_keys_new")
            db.execute("DELETE FROM tree_journal")
            self.store._set_meta(rebuilding="0")


# -- from the change stream --------------------------------------------------------------


def record_changes(records: Iterable[bytes | rec.Record]) -> list[tuple[str, Row | Gone]]:
    """What object records do to the mirror's tree: a put → its key, size and content hash;
    the last part of a large object → the same from its head (earlier parts: nothing yet);
    a delete → the key removed. Encoded records are decoded (``IntegrityError`` if malformed)."""
    out: list[tuple[str, Row | Gone]] = []
    for r in records:
        if isinstance(r, bytes | bytearray | memoryview):
            r = _header_only(bytes(r[: 5 + int.from_bytes(r[1:5], "big")]))
        version = (r.version.time_ns, r.version.seq)
        if isinstance(r, rec.Put) or (isinstance(r, rec.Part) and r.last):
            out.append((r.key, Row(r.head.size, r.head.content_hash, "", version)))
        elif isinstance(r, rec.Delete):
            out.append((r.key, Gone(version)))
    return out


def _header_only(data: bytes) -> rec.Record:
    """A record decoded from its tag and header alone (its body is not copied: the sink
    has checked it). Raises ``IntegrityError`` if malformed."""
    tag = data[:1]
    try:
        h = json.loads(data[5:])
        if tag == b"D" or not isinstance(h, dict):
            return rec.decode(data)
        key, version, head = h["k"], rec.Version.decode(h["v"]), rec.Head.from_json(h["h"])
        if not isinstance(key, str) or not key:
            raise ValueError("key is missing")
        if tag == b"P":
            return rec.Put(key, version, head, b"")
        index, count = h["i"], h["n"]
        if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
            raise ValueError("bad part index or count")
        return rec.Part(key, version, head, index, count, 0, b"")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise IntegrityError(f"malformed objects record: {exc}") from None


def update_from_records(tree: TreeStore, records: Iterable[bytes | rec.Record]) -> int:
    """Apply what the sink applied (records of one segment, in order) to the mirror's tree,
    in one transaction; a put older than the version the tree holds is skipped, as the
    mirror skips it. Returns the keys changed."""
    changes = record_changes(records)
    if not changes:
        return 0
    with tree._db:
        tree._db.execute("BEGIN IMMEDIATE")
        return tree.apply_in(changes, versioned=True)
