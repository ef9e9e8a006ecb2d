"""Merkle anti-entropy over an object key space.

``KeyTree`` is a binary Merkle tree of fixed depth ``D`` over ``2**D``
buckets; a key falls in the bucket given by the top ``D`` bits of
``xxh3_64(key)``. A key's leaf is ``leaf_hash(key, size, content hash)``; a
bucket's node is the leaf hash of (sum of its leaves mod 2**128, count), so
adding, changing or removing a key costs O(1) on its bucket plus the ``D``
nodes above it (recomputed lazily, once per ``root()``). Two trees over the
same ``D`` are compared top-down, descending only where nodes differ:
``k`` differences among ``n`` keys cost O(k·D) = O(k log n) node comparisons
plus the keys of the differing buckets.

``verify_buckets`` builds the tree of the source (content hashes from the
shipping index when the object is unchanged since shipped, else read and
hashed) and of the mirror (hashes from the mirror objects' ``dragent-xxh3``
metadata: no re-read unless ``deep``, which re-reads and re-hashes every
mirror object), compares them and repairs each difference (copy from the
source, or delete from the mirror) unless ``repair`` is false.

``accepted`` names keys whose delete an operator rejected (the mass-delete guard,
``replicators.objects.held``): such a key kept in the mirror while the source no
longer has it is an *accepted* difference, listed under ``accepted`` in the report
and neither a failure nor repaired. ``held`` names keys whose delete the guard holds,
awaiting a decision: such a difference is reported (a failure: it is not decided) but
not repaired, so a verify with repair cannot bypass the guard.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from replicators.bucket import Bucket
from replicators.errors import AlreadyExists, IntegrityError, NotFound
from replicators.objects.index import ShippedIndex
from replicators.objects.mirror import mirror_metadata
from replicators.objects.records import META_HASH, META_VERSION, Head, Version
from replicators.objects.trees import DEPTH, Row, TreeStore, key_leaf, partition_bits
from verifiers.merkle import HASH_SIZE, leaf_hash, node_hash
from verifiers.remote_tree import RemoteTree, RemoteTreeError

__all__ = [
    "DEPTH",
    "KeyTree",
    "LocalTree",
    "compare",
    "compare_trees",
    "key_leaf",
    "verify_buckets",
]

_MOD = 1 << 128


@dataclass
class KeyTree:
    depth: int = DEPTH
    _buckets: dict[int, dict[str, bytes]] = field(default_factory=dict)
    _sums: dict[int, int] = field(default_factory=dict)
    _nodes: dict[int, bytes] = field(default_factory=dict)
    _dirty: set[int] = field(default_factory=set)

    def bucket(self, key: str) -> int:
        return xxhash.xxh3_64_intdigest(key.encode()) >> (64 - self.depth)

    def put(self, key: str, size: int, content_hash: str) -> None:
        """Add or replace ``key``'s leaf. O(1) now, O(depth) at the next ``root()``."""
        self._set(key, key_leaf(key, size, content_hash))

    def remove(self, key: str) -> None:
        self._set(key, None)

    def _set(self, key: str, leaf: bytes | None) -> None:
        b = self.bucket(key)
        leaves = self._buckets.setdefault(b, {})
        total = self._sums.get(b, 0)
        old = leaves.pop(key, None)
        if old is not None:
            total -= int.from_bytes(old, "big")
        if leaf is not None:
            leaves[key] = leaf
            total += int.from_bytes(leaf, "big")
        self._sums[b] = total % _MOD
        if not leaves:
            del self._buckets[b], self._sums[b]
        self._dirty.add(b)

    def __len__(self) -> int:
        return sum(len(v) for v in self._buckets.values())

    def leaves(self, bucket: int) -> dict[str, bytes]:
        return self._buckets.get(bucket, {})

    def node(self, index: int) -> bytes | None:
        """Heap-indexed node (1 is the root); None for an empty subtree."""
        self._refresh()
        return self._nodes.get(index)

    def root(self) -> bytes:
        return self.node(1) or b"\x00" * HASH_SIZE

    def _refresh(self) -> None:
        if not self._dirty:
            return
        base = 1 << self.depth
        level = set()
        for b in self._dirty:
            if b in self._buckets:
                n = len(self._buckets[b])
                self._nodes[base + b] = leaf_hash(
                    self._sums[b].to_bytes(16, "big") + n.to_bytes(8, "big")
                )
            else:
                self._nodes.pop(base + b, None)
            level.add((base + b) >> 1)
        self._dirty.clear()
        while level:
            parents = set()
            for i in level:
                left, right = self._nodes.get(2 * i), self._nodes.get(2 * i + 1)
                if left is None and right is None:
                    self._nodes.pop(i, None)
                else:
                    self._nodes[i] = node_hash(
                        left or b"\x00" * HASH_SIZE, right or b"\x00" * HASH_SIZE
                    )
                if i > 1:
                    parents.add(i >> 1)
            level = parents


@dataclass
class Comparison:
    keys: list[str]
    """Keys whose leaves differ (present on one side only, or with other size/content)."""
    nodes_compared: int


def compare(a: KeyTree | TreeStore, b: KeyTree | TreeStore) -> Comparison:
    """Keys that differ between ``a`` and ``b`` (same depth), descending only into differences.

    Either tree may be in memory (``KeyTree``) or persisted (``TreeStore``: the same nodes;
    a persisted tree reads only the partitions and buckets the descent reaches)."""
    if a.depth != b.depth:
        raise ValueError("trees of different depths cannot be compared")
    base = 1 << a.depth
    stack, keys, compared = [1], [], 0
    while stack:
        i = stack.pop()
        compared += 1
        if a.node(i) == b.node(i):
            continue
        if i >= base:
            la, lb = a.leaves(i - base), b.leaves(i - base)
            keys += [k for k in la.keys() | lb.keys() if la.get(k) != lb.get(k)]
        else:
            stack += [2 * i, 2 * i + 1]
    return Comparison(sorted(keys), compared)


# -- source against mirror ------------------------------------------------------

CONCURRENCY = 16


async def _map(items: list[Any], fn: Any) -> list[Any]:
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(item: Any) -> Any:
        async with sem:
            return await fn(item)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(one(i)) for i in items]
    return [t.result() for t in tasks]


async def source_tree(bucket: Any, index: Any | None) -> tuple[KeyTree, dict[str, Any], int]:
    """The source's tree; hashes from ``index`` for objects unchanged since shipped.

    Returns (tree, key → ObjectState, objects read and hashed).
    """
    tree, states, hashed = KeyTree(), {}, 0
    async for page in bucket.scan():
        need = []
        for obj in page:
            states[obj.key] = obj
            e = index.get(obj.key) if index is not None else None
            if e is not None and (e.etag, e.size, e.time_ns) == (obj.etag, obj.size, obj.time_ns):
                tree.put(obj.key, obj.size, e.content_hash)
            else:
                need.append(obj)
        digests = await _map(need, lambda o: _hash_or_none(bucket, o.key, o.etag))
        for obj, digest in zip(need, digests, strict=True):
            if digest is None:
                del states[obj.key]  # changed or deleted since listed: left out
            else:
                tree.put(obj.key, obj.size, digest)
        hashed += len(need)
    return tree, states, hashed


async def _hash_or_none(bucket: Bucket, key: str, etag: str) -> str | None:
    try:
        return await bucket.content_hash(key, etag)
    except (NotFound, AlreadyExists):
        return None


async def mirror_tree(bucket: Any, deep: bool) -> tuple[KeyTree, list[dict[str, Any]]]:
    """The mirror's tree from its metadata hashes; ``deep`` re-reads and re-hashes each object.

    Returns (tree, problems found by the deep scrub or missing metadata).
    """

    tree, problems = KeyTree(), []

    async def leaf(obj: Any) -> tuple[Any, str, str] | None:
        try:
            head = await bucket.head(obj.key)
            actual = await bucket.content_hash(obj.key, head.etag) if deep else ""
        except (NotFound, AlreadyExists):
            return None  # changed or deleted since listed: left out
        return obj, head.metadata.get(META_HASH, ""), actual

    async for page in bucket.scan():
        for item in await _map(page, leaf):
            if item is None:
                continue
            obj, recorded, actual = item
            if not recorded:
                problems.append({"what": "no content hash in metadata", "where": obj.key})
            if deep and recorded != actual:
                problems.append({"what": "bytes differ from their recorded hash", "where": obj.key})
            tree.put(obj.key, obj.size, actual if deep else recorded or "0" * 32)
    return tree, problems


async def copy_object(src: Any, dst: Any, key: str, part_size: int) -> str:
    """Copy ``key`` from ``src`` to ``dst`` as the mirror holds it (metadata, hash, version),
    part by part for large objects. Returns the content hash. Raises the stores' errors."""

    state = await src.head(key)
    digest = await src.content_hash(key, state.etag)
    meta = {k: v for k, v in state.metadata.items() if not k.startswith("dragent-")}
    head = Head(state.size, state.content_type, meta, digest)
    metadata = mirror_metadata(head, Version(state.time_ns, 0))
    if state.size <= part_size:
        await dst.write(key, await src.read(key, state.etag), state.content_type, metadata)
        return digest
    upload = await dst.start_upload(key, state.content_type, metadata)
    etags = []
    for number, offset in enumerate(range(0, state.size, part_size), start=1):
        body = await src.read(key, state.etag, offset, min(offset + part_size, state.size))
        etags.append(await dst.upload_part(key, upload, number, body))
    await dst.finish_upload(key, upload, etags)
    return digest


async def verify_buckets(
    name: str,
    options: Any,
    *,
    index_path: Path | None = None,
    region: str = "",
    deep: bool = False,
    repair: bool = False,
    accepted: Mapping[str, Mapping[str, Any]] | None = None,
    held: Collection[str] = (),
    trees: tuple[Path, Path | RemoteTree] | None = None,
) -> dict[str, Any]:
    """Compare the source bucket with the mirror and (with ``repair``) fix the mirror.

    ``index_path``: the source's shipping index (``shipped.sqlite``), if it exists.
    ``trees``: (source tree, mirror tree) persisted key trees (``replicators.objects.trees``;
    the source's lives in the shipping index); the mirror's may be a peer's, read over its
    agent's API (``verifiers.remote_tree.RemoteTree``, closed here). When both exist and
    have been built (and not ``deep``), the trees are compared instead of listings (the
    report has ``from_trees``), and each differing key is confirmed against both buckets
    (HEAD) before it is reported or repaired, so a stale tree never causes a wrong repair;
    otherwise both trees are built from full listings (``trees_skipped`` says why).
    ``accepted``: key → its rejection record; ``held``: keys whose delete is held (see
    the module docstring).
    Returns the unsigned report (verifiers.report fields). Raises the stores' errors.
    """

    started = time.time()
    persisted, skipped = None, ""
    if trees is not None and deep:
        skipped = "a deep verify reads every object"
        if isinstance(trees[1], RemoteTree):
            await trees[1].aclose()
    elif trees is not None:
        persisted, skipped = await _open_trees(trees)
    try:
        src, dst = await Bucket.open(options.source), await Bucket.open(options.mirror)
    except BaseException:
        await _close_trees(persisted)
        raise
    index = ShippedIndex(index_path) if index_path is not None else None
    mtree_store: TreeStore | None = None
    try:
        if persisted is not None:
            found_t = await _from_trees(src, dst, index, *persisted)
            differences, states, hashed = found_t.differences, found_t.states, found_t.hashed
            counts, roots = found_t.counts, found_t.roots
            nodes_compared, at, extra = found_t.nodes_compared, found_t.at, found_t.extra
            if isinstance(persisted[1], LocalTree):
                mtree_store = persisted[1].store
            else:  # the peer's tree learns of a repair at its next rebuild
                extra["mirror_tree_updated_by_repair"] = False
        else:
            (stree, states, hashed), (mtree, problems) = await asyncio.gather(
                source_tree(src, index), mirror_tree(dst, deep)
            )
            found = compare(stree, mtree)
            differences = list(_describe(found.keys, stree, mtree)) + problems
            counts = {"source": len(stree), "mirror": len(mtree)}
            roots = {"source": stree.root().hex(), "mirror": mtree.root().hex()}
            nodes_compared = found.nodes_compared
            extra = {"trees_skipped": skipped} if skipped else {}
            at = (
                f"listings of {options.source.bucket}/{options.source.prefix} and "
                f"{options.mirror.bucket}/{options.mirror.prefix}"
            )
        differences, kept = _accepted(differences, accepted or {})
        waiting = set()
        for d in differences:
            if d["where"] in held and d["what"] == "not in the source":
                d["why"] = "its delete is held by the mass-delete guard, awaiting a decision"
                waiting.add(d["where"])
        repaired = 0
        if repair:
            keys = sorted({d["where"] for d in differences} - waiting)  # accepted: left too
            doomed = [k for k in keys if k not in states]
            limit = options.delete_guard.policy().limit(counts["mirror"])
            if options.delete_guard.enabled and len(doomed) > limit:
                # a repair is no way around the mass-delete guard: that many deletes wait
                # for the log (where the guard decides), not for a verify
                why = (f"a repair would delete {len(doomed)} keys from the mirror, more than "
                       f"the mass-delete guard allows ({limit}): left for the guard")  # fmt: skip
                for d in differences:
                    if d["where"] in doomed:
                        d["why"] = why
                        waiting.add(d["where"])
                keys = [k for k in keys if k in states]
            for key in keys:
                if key in states:
                    digest = await copy_object(src, dst, key, int(options.part_size))
                    fixed: Row | None = Row(states[key].size, digest)
                else:
                    await dst.delete(key)
                    fixed = None
                if mtree_store is not None:  # the mirror's tree says what the repair did
                    await asyncio.to_thread(mtree_store.apply, [(key, fixed)])
                repaired += 1
    finally:
        if index is not None:
            index.close()
        await _close_trees(persisted)
        await src.aclose()
        await dst.aclose()
    ok = not differences or (repair and repaired == len({d["where"] for d in differences}))
    return {
        "kind": "objects",
        "stream": name,
        "region": region,
        "started_at": started,
        "finished_at": time.time(),
        "at": at,
        "ok": bool(ok),
        "summary": f"{len(differences)} differences among {counts['source']} source and "
        f"{counts['mirror']} mirror objects"
        + (f"; {len(kept)} accepted (deletes rejected)" if kept else "")
        + (f"; {repaired} repaired" if repair else ""),
        "roots": roots,
        "counts": counts,
        "differences": differences,
        "accepted": kept,
        "repaired": repaired,
        "deep": deep,
        "nodes_compared": nodes_compared,
        "source_objects_hashed": hashed,
        **extra,
    }


def _accepted(
    differences: list[dict[str, Any]], accepted: Mapping[str, Mapping[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(differences, accepted ones): a key the mirror keeps because its delete was rejected."""
    left, kept = [], []
    for d in differences:
        why = accepted.get(d["where"])
        if why is not None and d["what"] == "not in the source":
            kept.append({**d, "why": "its delete was rejected by an operator", **why})
        else:
            left.append(d)
    return left, kept


def _describe(keys: list[str], src: KeyTree, dst: KeyTree) -> Iterator[dict[str, Any]]:
    for key in keys:
        b = src.bucket(key)
        in_src, in_dst = key in src.leaves(b), key in dst.leaves(b)
        what = (
            "missing in the mirror"
            if not in_dst
            else "not in the source"
            if not in_src
            else "size or content differs"
        )
        yield {"what": what, "where": key}


# -- from persisted trees ----------------------------------------------------------------


class LocalTree:
    """A persisted ``TreeStore`` read the way ``compare_trees`` reads a tree (in a thread)."""

    def __init__(self, store: TreeStore) -> None:
        self.store = store
        self.depth, self.partitions = store.depth, store.partitions

    @property
    def where(self) -> str:
        return str(self.store.path)

    @property
    def built_at(self) -> float | None:
        return self.store.built_at

    def info(self) -> dict[str, Any]:
        return self.store.info()

    async def root(self) -> bytes:
        return await asyncio.to_thread(self.store.root)

    async def partition_roots(self) -> dict[int, bytes]:
        return await asyncio.to_thread(self.store.partition_roots)

    async def nodes(self, level: int, indices: list[int]) -> dict[int, bytes | None]:
        def read() -> dict[int, bytes | None]:
            return {i: self.store.node_at(level, i) for i in indices}

        return await asyncio.to_thread(read)

    async def leaves(self, buckets: list[int]) -> dict[int, dict[str, bytes]]:
        def read() -> dict[int, dict[str, bytes]]:
            return {b: self.store.leaves(b) for b in buckets}

        return await asyncio.to_thread(read)

    async def aclose(self) -> None:
        self.store.close()


Tree = LocalTree | RemoteTree


async def compare_trees(a: Tree, b: Tree) -> Comparison:
    """``compare`` for persisted trees, local or a peer's: the partition roots first, then
    level by level only below the nodes that differ (one batched read per level and side),
    then the keys of the differing hash buckets. Raises ``ValueError`` if the trees are not
    cut alike (depth, partitions), ``RemoteTreeError`` if a peer's cannot be read."""
    if (a.depth, a.partitions) != (b.depth, b.partitions):
        raise ValueError("trees of different depths or partition counts cannot be compared")
    ra, rb = await asyncio.gather(a.partition_roots(), b.partition_roots())
    parts = ra.keys() | rb.keys()
    frontier = sorted(p for p in parts if ra.get(p) != rb.get(p))
    compared = len(parts)
    level = partition_bits(a.partitions, a.depth)
    while level < a.depth and frontier:
        level += 1
        children = [c for i in frontier for c in (2 * i, 2 * i + 1)]
        na, nb = await asyncio.gather(a.nodes(level, children), b.nodes(level, children))
        compared += len(children)
        frontier = [c for c in children if na.get(c) != nb.get(c)]
    keys: list[str] = []
    if frontier:
        la, lb = await asyncio.gather(a.leaves(frontier), b.leaves(frontier))
        for n in frontier:
            x, y = la.get(n, {}), lb.get(n, {})
            keys += [k for k in x.keys() | y.keys() if x.get(k) != y.get(k)]
    return Comparison(sorted(keys), compared)


def _open_local(path: Path) -> LocalTree | str:
    """The persisted tree at ``path`` if it exists and has been built; else why not."""
    if not path.exists():
        return f"no tree at {path}"
    try:
        store = TreeStore(path)
    except (ValueError, OSError, sqlite3.Error) as exc:
        return f"{path}: {exc}"
    if store.built_at is None:
        store.close()
        return f"{path}: not rebuilt in full yet"
    return LocalTree(store)


async def _open_trees(
    trees: tuple[Path, Path | RemoteTree],
) -> tuple[tuple[Tree, Tree] | None, str]:
    """Both persisted trees, if both exist, have been built and are cut alike; else
    (None, why not), for a full rebuild from listings. Closes what it does not return."""
    source, mirror = trees
    remote = mirror if isinstance(mirror, RemoteTree) else None
    a: Tree | str | None = None
    b: Tree | str | None = None
    ok = False
    try:
        a = await asyncio.to_thread(_open_local, source)
        if isinstance(a, str):
            return None, f"source: {a}"
        if remote is not None:
            try:
                await remote.load()
            except RemoteTreeError as exc:
                return None, f"mirror: {exc}"
            b = remote if remote.built_at is not None else f"{remote.where}: not rebuilt yet"
        else:
            assert isinstance(mirror, Path)
            b = await asyncio.to_thread(_open_local, mirror)
        if isinstance(b, str):
            return None, f"mirror: {b}"
        if (a.depth, a.partitions) != (b.depth, b.partitions):
            return None, "the trees are not cut alike (depth, partitions)"
        ok = True
        return (a, b), ""
    finally:
        if not ok:
            for t in {
                id(t): t for t in (a, b, remote) if t is not None and not isinstance(t, str)
            }.values():
                await t.aclose()


async def _close_trees(trees: tuple[Tree, Tree] | None) -> None:
    for t in trees or ():
        await t.aclose()


@dataclass
class _TreeFindings:
    differences: list[dict[str, Any]]
    states: dict[str, Any]
    hashed: int
    counts: dict[str, int]
    roots: dict[str, str]
    nodes_compared: int
    at: str
    extra: dict[str, Any]


async def _from_trees(
    src: Any, dst: Any, index: ShippedIndex | None, stree: Tree, mtree: Tree
) -> _TreeFindings:
    """Compare the persisted trees (partition roots first, then only where they differ),
    then confirm each candidate key against both buckets: only a confirmed difference is
    reported."""
    found = await compare_trees(stree, mtree)
    hashed = 0

    async def confirm(key: str) -> tuple[str, Any, str, Any, str]:
        nonlocal hashed
        try:
            s = await src.head(key)
        except NotFound:
            s = None
        digest = ""
        if s is not None:
            e = index.get(key) if index is not None else None
            if e is not None and (e.etag, e.size, e.time_ns) == (s.etag, s.size, s.time_ns):
                digest = e.content_hash
            else:
                hashed += 1
                got = await _hash_or_none(src, key, s.etag)
                s, digest = (s, got) if got is not None else (None, "")
        try:
            m = await dst.head(key)
        except NotFound:
            m = None
        return key, s, digest, m, (m.metadata.get(META_HASH, "") if m is not None else "")

    differences, states, stale = [], {}, 0
    for key, s, digest, m, recorded in await _map(found.keys, confirm):
        if s is not None:
            states[key] = s
        if s is None and m is None:
            what = ""
        elif m is None:
            what = "missing in the mirror"
        elif s is None:
            what = "not in the source"
        elif (s.size, digest) != (m.size, recorded):
            what = "size or content differs"
        else:
            what = ""
        if what:
            differences.append({"what": what, "where": key})
        else:
            stale += 1  # the trees differ where the buckets agree: a tree is behind
    info = {"source": await asyncio.to_thread(stree.info), "mirror": mtree.info()}
    roots = {"source": (await stree.root()).hex(), "mirror": (await mtree.root()).hex()}
    return _TreeFindings(
        differences=differences,
        states=states,
        hashed=hashed,
        counts={"source": info["source"]["keys"], "mirror": info["mirror"]["keys"]},
        roots=roots,
        nodes_compared=found.nodes_compared,
        at=f"persisted key trees {stree.where} and {mtree.where}, "
        "candidates confirmed against both buckets",
        extra={
            "from_trees": True,
            "trees": info,
            "candidates": len(found.keys),
            "candidates_not_confirmed": stale,
        },
    )


def _version(metadata: Mapping[str, str]) -> tuple[int, int]:
    """The version the mirror object records (``dragent-version``), (0, 0) if none."""
    try:
        v = Version.decode(metadata.get(META_VERSION, ""))
    except IntegrityError:
        return (0, 0)
    return (v.time_ns, v.seq)


async def rebuild_mirror_tree(
    tree: TreeStore, bucket: Any, listing: AsyncIterator[list[Any]] | None = None
) -> dict[str, Any]:
    """Rebuild the mirror's persisted tree from a full listing (``bucket.scan()`` unless
    ``listing`` gives pages of objects with key, size and etag, e.g. an S3 Inventory:
    ``verifiers.inventory``), to catch drift. A key whose etag and size the tree already
    holds keeps its hash; the others are read with a HEAD (``dragent-xxh3``). Changes
    applied meanwhile are kept (the rebuild's journal). Returns counts."""
    build = await asyncio.to_thread(tree.begin_rebuild)
    listed = headed = 0

    async def head(obj: Any) -> tuple[str, Row] | None:
        try:
            h = await bucket.head(obj.key)
        except (NotFound, AlreadyExists):
            return None  # gone since listed: the stream tells the tree
        return obj.key, Row(h.size, h.metadata.get(META_HASH, ""), h.etag, _version(h.metadata))

    try:
        async for page in listing if listing is not None else bucket.scan():
            rows: list[tuple[str, Row]] = []
            need = []
            for obj in page:
                known = tree.get(obj.key)
                if (
                    known is not None
                    and known.etag
                    and (known.etag, known.size)
                    == (
                        obj.etag,
                        obj.size,
                    )
                ):
                    rows.append((obj.key, known))
                else:
                    need.append(obj)
            rows += [r for r in await _map(need, head) if r is not None]
            listed += len(page)
            headed += len(need)
            await asyncio.to_thread(build.add, rows)
    except BaseException:
        await asyncio.to_thread(build.abort)
        raise
    await asyncio.to_thread(build.finish, "listing" if listing is None else "inventory")
    return {"listed": listed, "headed": headed, "keys": len(tree)}
