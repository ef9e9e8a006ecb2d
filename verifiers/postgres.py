"""Consistency proof of two PostgreSQL copies: range hash trees computed inside each database.

For each table, the key space ``[min, max]`` of both copies is a tree (the
key: a single integer primary key as it is; any other primary key, composite,
text or uuid, by a 64-bit hash of its columns; a table without one by a hash of
the whole row, ``row_key``): a node is a key range, its children
the ``FANOUT`` equal sub-ranges. A node's hash is computed *inside* each
database over the rows of its range: the XOR of the first 64 bits of
``md5(row::text)`` of every row, with the row count. XOR makes a parent the
combination of its children (a homomorphic set hash), so the root summarizes
the table and rows never travel. The comparison descends only into ranges
whose (hash, count) differ, down to ranges of at most ``LEAF_ROWS`` rows, so
k differences in n rows cost O(k log n) range queries per side.

The copies are compared at the same LSN: a standby (in recovery) is first
waited for until it has replayed the primary's current LSN; on a live standby
a differing range is rechecked after it has caught up again, until it
converges or is still different after ``RECHECKS`` rounds. A restored copy
(promoted) is compared as it is; the report records both LSNs.

Errors: ``SourceError`` when a database is unreachable. Every table is compared
(``skipped_tables`` stays in the report, empty).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from replicators.errors import SourceError

FANOUT = 16
LEAF_ROWS = 64
RECHECKS = 3
_INT_TYPES = ("smallint", "integer", "bigint")


@dataclass(frozen=True)
class Node:
    lo: int
    hi: int  # inclusive
    count: int
    digest: int


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Key:
    """What places a table's rows in the range tree: an SQL expression over the row alias
    ``t`` that gives a bigint, and how reports name it."""

    expr: str
    name: str


async def row_key(conn: asyncpg.Connection, table: str) -> Key:
    """The key of ``table``'s range tree. A single integer primary key is used as it is
    (differing ranges are key ranges); any other primary key (composite, text, uuid...) by
    a 64-bit hash of its columns; a table without one by a hash of the whole row (identical
    rows then cancel in the XOR, and the row count tells them apart)."""
    rows = await conn.fetch(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type "
        "FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
        "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = $1::regclass AND i.indisprimary "
        "ORDER BY array_position(i.indkey, a.attnum)",
        table,
    )
    names = [str(r["attname"]) for r in rows]
    if len(rows) == 1 and rows[0]["type"] in _INT_TYPES:
        return Key(f"t.{_ident(names[0])}", names[0])
    if rows:
        columns = ", ".join(f"t.{_ident(n)}" for n in names)
        return Key(f"hashtextextended(({columns})::text, 0)", f"hash of ({', '.join(names)})")
    return Key("hashtextextended(t::text, 0)", "hash of the whole row")


AGENT_TABLES = ("dragent_heartbeat",)
"""The agent's own tables in the application's database (the failover heartbeat, written
several times a second by design): never part of a comparison."""


async def list_tables(conn: asyncpg.Connection) -> list[str]:
    """The application's tables: every user table but the agent's own."""
    rows = await conn.fetch(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') "
        "AND tablename <> ALL($1::text[]) ORDER BY 1",
        list(AGENT_TABLES),
    )
    return [r[0] for r in rows]


class TableHasher:
    """Range hashes of one table in one database."""

    def __init__(self, conn: asyncpg.Connection, table: str, key: Key) -> None:
        self.conn = conn
        self.table = table
        self.key = key
        self.queries = 0

    async def bounds(self) -> tuple[int, int] | None:
        k = self.key.expr
        row = await self.conn.fetchrow(f"SELECT min({k}), max({k}) FROM {self.table} t")
        assert row is not None
        return None if row[0] is None else (int(row[0]), int(row[1]))

    async def node(self, lo: int, hi: int) -> Node:
        """(count, XOR of md5-64 of rows) over keys in ``[lo, hi]``, computed in the database."""
        self.queries += 1
        k = self.key.expr
        row = await self.conn.fetchrow(
            f"SELECT count(*), coalesce(bit_xor(('x' || left(md5(t::text), 16))::bit(64)::bigint),"
            f" 0) FROM {self.table} t WHERE {k} BETWEEN $1 AND $2",
            lo,
            hi,
        )
        assert row is not None
        return Node(lo, hi, int(row[0]), int(row[1]))


async def table_roots(dsn: str, tables: list[str]) -> dict[str, dict[str, Any]]:
    """The root and row count of each of ``tables`` in one database, as ``compare`` gives
    them (a root over a range holding every row is the same whatever that range).
    A table that is missing or has no usable primary key maps to None."""
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise SourceError(f"cannot connect for verification: {exc}") from exc
    out: dict[str, dict[str, Any]] = {}
    try:
        present = set(await list_tables(conn))
        for table in tables:
            if table not in present:
                out[table] = {"root": None, "rows": None}
                continue
            hasher = TableHasher(conn, table, await row_key(conn, table))
            lo, hi = await hasher.bounds() or (0, 0)
            node = await hasher.node(lo, hi)
            out[table] = {"root": _hex(node), "rows": node.count}
    finally:
        await conn.close()
    return out


def split(lo: int, hi: int, fanout: int = FANOUT) -> list[tuple[int, int]]:
    """``[lo, hi]`` cut into at most ``fanout`` contiguous inclusive ranges."""
    width = hi - lo + 1
    parts = min(fanout, width)
    out = []
    start = lo
    for i in range(parts):
        end = lo + (width * (i + 1)) // parts - 1
        out.append((start, end))
        start = end + 1
    return out


async def diff_ranges(a: TableHasher, b: TableHasher, lo: int, hi: int) -> list[dict[str, Any]]:
    """Every minimal range in ``[lo, hi]`` whose rows differ, descending only where they do."""
    na, nb = await asyncio.gather(a.node(lo, hi), b.node(lo, hi))
    if (na.count, na.digest) == (nb.count, nb.digest):
        return []
    if max(na.count, nb.count) <= LEAF_ROWS or lo == hi:
        return [{"what": "rows differ", "where": f"{a.table} {a.key.name} in [{lo}, {hi}]",
                 "table": a.table, "lo": lo, "hi": hi, "counts": [na.count, nb.count]}]  # fmt: skip
    out: list[dict[str, Any]] = []
    for sub_lo, sub_hi in split(lo, hi):
        out += await diff_ranges(a, b, sub_lo, sub_hi)
    return out


async def _lsn_state(conn: asyncpg.Connection) -> tuple[bool, str]:
    row = await conn.fetchrow(
        "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() "
        "THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text"
    )
    assert row is not None
    return bool(row[0]), str(row[1])


async def _wait_replayed(copy: asyncpg.Connection, lsn: str, within: float) -> None:
    deadline = time.monotonic() + within
    while not await copy.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn):
        if time.monotonic() > deadline:
            raise SourceError(f"the standby did not replay {lsn} within {within:.0f}s")
        await asyncio.sleep(0.2)


async def compare(
    primary_dsn: str,
    copy_dsn: str,
    tables: list[str] | None = None,
    *,
    catch_up_within: float = 60.0,
) -> dict[str, Any]:
    """Compare two copies; returns the unsigned report body (see verifiers/report.py)."""
    started = time.time()
    try:
        p = await asyncpg.connect(primary_dsn, timeout=10)
        c = await asyncpg.connect(copy_dsn, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise SourceError(f"cannot connect for verification: {exc}") from exc
    try:
        _, primary_lsn = await _lsn_state(p)
        standby, _ = await _lsn_state(c)
        if standby:
            await _wait_replayed(c, primary_lsn, catch_up_within)
        _, copy_lsn = await _lsn_state(c)
        names = tables or await list_tables(p)
        per_table: dict[str, dict[str, Any]] = {}
        differences: list[dict[str, Any]] = []
        skipped: list[str] = []
        queries = 0
        for table in names:
            key = await row_key(p, table)
            ha, hb = TableHasher(p, table, key), TableHasher(c, table, key)
            bounds = [b for b in (await ha.bounds(), await hb.bounds()) if b is not None]
            lo = min((b[0] for b in bounds), default=0)
            hi = max((b[1] for b in bounds), default=0)
            ra, rb = await asyncio.gather(ha.node(lo, hi), hb.node(lo, hi))
            per_table[table] = {
                "key": key.name,
                "primary": {"root": _hex(ra), "rows": ra.count},
                "copy": {"root": _hex(rb), "rows": rb.count},
            }
            found = await diff_ranges(ha, hb, lo, hi)
            if standby and found:
                found = await _recheck(p, c, ha, hb, found, catch_up_within)
            differences += found
            queries += ha.queries + hb.queries
    finally:
        await p.close()
        await c.close()
    ok = not differences
    return {
        "kind": "postgres",
        "started_at": started,
        "finished_at": time.time(),
        "at": {"primary_lsn": primary_lsn, "copy_lsn": copy_lsn, "copy_is_standby": standby},
        "ok": ok,
        "summary": (
            f"{len(per_table)} tables equal"
            if ok
            else f"{len(differences)} differing key ranges in {len(per_table)} tables"
        ),
        "roots": {side: _combined(per_table, side) for side in ("primary", "copy")},
        "counts": {
            side: sum(t[side]["rows"] for t in per_table.values()) for side in ("primary", "copy")
        },
        "tables": per_table,
        "differences": differences,
        "skipped_tables": skipped,
        "range_queries": queries,
    }


def _combined(per_table: dict[str, dict[str, Any]], side: str) -> str:
    """One root per side over every table: SHA-256 of the sorted (table, root, rows)."""
    lines = [f"{t}\t{v[side]['root']}\t{v[side]['rows']}" for t, v in sorted(per_table.items())]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


async def _recheck(
    p: asyncpg.Connection,
    c: asyncpg.Connection,
    ha: TableHasher,
    hb: TableHasher,
    found: list[dict[str, Any]],
    within: float,
) -> list[dict[str, Any]]:
    """On a live standby: recheck differing ranges after it catches up again."""
    for _ in range(RECHECKS):
        _, lsn = await _lsn_state(p)
        await _wait_replayed(c, lsn, within)
        still = []
        for d in found:
            still += await diff_ranges(ha, hb, d["lo"], d["hi"])
        if not still:
            return []
        found = still
    return found


def _hex(node: Node) -> str:
    return f"{node.digest & 0xFFFFFFFFFFFFFFFF:016x}"
