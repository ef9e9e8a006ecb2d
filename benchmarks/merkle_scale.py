"""Merkle verify at scale: persisted per-partition key trees against rebuilding from listings.

Usage: ``python benchmarks/merkle_scale.py [--json] [--keys N] [--differences K]
[--updates U] [--workdir DIR]``; or ``from benchmarks.merkle_scale import run``.

- build (reported apart, not part of any verify): two persisted trees
  (``replicators.objects.trees.TreeStore``, SQLite, 64 partitions) of ``N`` keys each, the
  mirror's differing in ``K`` keys (content changed, missing in the mirror, extra in the
  mirror, about a third each), each by a full rebuild from a generated listing; then ``U``
  identical stream changes applied to both (puts of new keys and overwrites, as the
  shipper's acks and the sink's applies do), which leaves their partitions stale as
  between two verifies.
- verify from persisted trees, in a child process: open both trees, compare (stale
  partition roots recomputed, then a descent from the root into differing partitions and
  buckets only); time and peak RSS (the child's own ``VmHWM``).
- rebuild from listings, in a child process: today's in-memory approach
  (``verifiers.objects.KeyTree``) fed by a generated listing of both sides (``N`` keys each,
  pages of 1,000 as S3 returns them, hashes known: no object reads), then compare; time and
  peak RSS. The listing's own cost against a real store (``N``/1000 LIST requests, plus one
  HEAD per mirror object today) is not in this figure, so it flatters the rebuild.

Neither figure includes confirming the ``K`` candidates against the buckets (``K`` HEADs of
each side, done by ``verify_buckets`` before anything is reported or repaired).
``--json`` prints the figures as JSON on stdout and a summary on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import xxhash

from benchmarks._rss import peak_rss_mb
from replicators.objects.trees import PARTITIONS, Row, TreeStore

HERE = Path(__file__).resolve()


def _row(i: int, salt: str = "") -> tuple[str, Row]:
    return f"data/{i:09d}.bin", Row(
        1000 + i % 65_536, xxhash.xxh3_128_hexdigest(f"{salt}{i}".encode()), f"etag{i}"
    )


def _differences(keys: int, differences: int) -> tuple[set[int], set[int], int]:
    """(changed indexes, indexes missing in the mirror, count of mirror-only keys)."""
    step = max(1, keys // max(1, differences))
    picked = [i * step for i in range(differences)]
    changed = set(picked[0::3])
    missing = set(picked[1::3])
    return changed, missing, len(picked[2::3])


def source_rows(keys: int) -> Iterator[tuple[str, Row]]:
    for i in range(keys):
        yield _row(i)


def mirror_rows(keys: int, differences: int) -> Iterator[tuple[str, Row]]:
    changed, missing, extra = _differences(keys, differences)
    for i in range(keys):
        if i in missing:
            continue
        yield _row(i, "changed" if i in changed else "")
    for j in range(extra):
        yield _row(keys + j)


def expected_keys(keys: int, differences: int) -> list[str]:
    changed, missing, extra = _differences(keys, differences)
    return sorted(
        [_row(i)[0] for i in changed | missing] + [_row(keys + j)[0] for j in range(extra)]
    )


def updates(keys: int, count: int) -> list[tuple[str, Row]]:
    """Stream changes applied to both trees alike: half overwrites, half new keys."""
    out = []
    for u in range(count):
        i = (u * 7919) % keys if u % 2 else keys + 1_000_000 + u
        out.append(_row(i, f"update{u}"))
    return out


# -- children ----------------------------------------------------------------------------


def _peak_mb() -> float:
    return peak_rss_mb()


def child_build(workdir: Path, keys: int, differences: int, n_updates: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side, rows in (
        ("source", source_rows(keys)),
        ("mirror", mirror_rows(keys, differences)),
    ):
        path = workdir / f"{side}.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        t0 = time.perf_counter()
        tree = TreeStore(path, partitions=PARTITIONS)
        tree.rebuild(rows, "generated listing")
        out[f"{side}_build_s"] = round(time.perf_counter() - t0, 2)
        changes = updates(keys, n_updates)
        t0 = time.perf_counter()
        for start in range(0, len(changes), 100):  # one transaction per segment of 100
            tree.apply(changes[start : start + 100])
        out[f"{side}_updates_s"] = round(time.perf_counter() - t0, 3)
        tree.close()
        out[f"{side}_db_mb"] = round(
            sum(os.path.getsize(p) for p in workdir.glob(f"{side}.sqlite*")) / 1e6, 1
        )
    out["build_peak_rss_mb"] = _peak_mb()
    return out


def child_verify_persisted(workdir: Path) -> dict[str, Any]:
    from verifiers.objects import compare

    t0 = time.perf_counter()
    a, b = TreeStore(workdir / "source.sqlite"), TreeStore(workdir / "mirror.sqlite")
    stale = sum(
        int(n)
        for tree in (a, b)
        for (n,) in tree._db.execute("SELECT count(*) FROM tree_parts WHERE stale = 1")
    )
    found = compare(a, b)
    roots = (a.root().hex(), b.root().hex())
    seconds = time.perf_counter() - t0
    a.close()
    b.close()
    return {
        "seconds": round(seconds, 3),
        "peak_rss_mb": _peak_mb(),
        "keys_found": found.keys,
        "nodes_compared": found.nodes_compared,
        "stale_partitions_recomputed": stale,
        "roots": roots,
    }


def child_verify_rebuild(keys: int, differences: int, n_updates: int) -> dict[str, Any]:
    from verifiers.objects import KeyTree, compare

    def pages(rows: Iterator[tuple[str, Row]]) -> Iterator[list[tuple[str, Row]]]:
        page: list[tuple[str, Row]] = []
        for item in rows:
            page.append(item)
            if len(page) == 1000:
                yield page
                page = []
        if page:
            yield page

    def with_updates(rows: Iterator[tuple[str, Row]]) -> Iterator[tuple[str, Row]]:
        changed = dict(updates(keys, n_updates))
        for key, row in rows:
            yield key, changed.pop(key, row)
        yield from changed.items()

    t0 = time.perf_counter()
    trees = []
    for rows in (source_rows(keys), mirror_rows(keys, differences)):
        tree = KeyTree()
        for page in pages(with_updates(rows)):
            for key, row in page:
                tree.put(key, row.size, row.content_hash)
        trees.append(tree)
    found = compare(trees[0], trees[1])
    seconds = time.perf_counter() - t0
    return {
        "seconds": round(seconds, 3),
        "peak_rss_mb": _peak_mb(),
        "keys_found": found.keys,
        "nodes_compared": found.nodes_compared,
        "roots": (trees[0].root().hex(), trees[1].root().hex()),
    }


def _child(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(HERE), "--child", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(proc.stdout)


def run(
    keys: int = 1_000_000,
    differences: int = 10,
    updates_between: int = 1_000,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Build both persisted trees, then time each verify in a child process (see the module
    docstring). Returns the figures; raises if a verify misses or invents a difference."""
    with tempfile.TemporaryDirectory(prefix="merkle-scale-", dir=workdir) as tmp:
        work = Path(tmp)
        n = str(keys)
        k = str(differences)
        u = str(updates_between)
        build = _child("build", str(work), n, k, u)
        persisted = _child("persisted", str(work))
        rebuilt = _child("rebuild", n, k, u)
    want = expected_keys(keys, differences)
    for name, fig in (("persisted", persisted), ("rebuild", rebuilt)):
        if fig["keys_found"] != want:
            raise AssertionError(f"{name}: found {fig['keys_found']}, expected {want}")
    if persisted["roots"] != rebuilt["roots"]:
        raise AssertionError("persisted and in-memory trees have different roots")
    return {
        "keys": keys,
        "differences": differences,
        "partitions": PARTITIONS,
        "updates_between": updates_between,
        "build": build,
        "verify_persisted": {x: v for x, v in persisted.items() if x not in ("keys_found",)},
        "verify_rebuild_from_listing": {
            x: v for x, v in rebuilt.items() if x not in ("keys_found",)
        },
        "differences_found": len(want),
        "targets": {"seconds": 5, "peak_rss_mb": 300},
        "met": persisted["seconds"] < 5 and persisted["peak_rss_mb"] < 300,
        "host": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
    }


def table(res: dict[str, Any]) -> str:
    p, r, b = res["verify_persisted"], res["verify_rebuild_from_listing"], res["build"]
    return "\n".join(
        [
            f"Merkle verify, {res['keys']:,} keys, {res['differences']} differences "
            f"({res['updates_between']} stream changes since the build):",
            f"  from persisted trees: {p['seconds']} s, peak RSS {p['peak_rss_mb']} MB, "
            f"{p['nodes_compared']} nodes, {p['stale_partitions_recomputed']} stale "
            "partitions recomputed",
            f"  rebuilt from listings: {r['seconds']} s, peak RSS {r['peak_rss_mb']} MB",
            f"  build (apart): source {b['source_build_s']} s, mirror {b['mirror_build_s']} s; "
            f"{res['updates_between']} changes {b['source_updates_s']} s; "
            f"files {b['source_db_mb']} + {b['mirror_db_mb']} MB",
            f"  targets < 5 s and < 300 MB: {'met' if res['met'] else 'NOT met'}",
        ]
    )


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, rest = sys.argv[2], sys.argv[3:]
        if mode == "build":
            out = child_build(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))
        elif mode == "persisted":
            out = child_verify_persisted(Path(rest[0]))
        else:
            out = child_verify_rebuild(int(rest[0]), int(rest[1]), int(rest[2]))
        print(json.dumps(out))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--differences", type=int, default=10)
    ap.add_argument("--updates", type=int, default=1_000)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    res = run(args.keys, args.differences, args.updates, args.workdir)
    if args.json:
        print(json.dumps(res, indent=2))
        print(table(res), file=sys.stderr)
    else:
        print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
