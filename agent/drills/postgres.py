"""The restore drill of a ``postgres`` stream: point-in-time restore, then a Merkle comparison.

1. ``restore`` (``replicators/postgres/restore.py``): the newest base backup
   before the target and the vault's WAL (every segment verified, continuity
   checked) into a scratch data directory, started on a free port and
   promoted.
2. ``verify`` (``verifiers/postgres.py``): the restored cluster is compared
   table by table (range hash trees computed inside each database) with this
   region's own copy, the warm standby named by ``[streams.postgres] dsn``
   (no database connection crosses regions), at the LSN the standby has
   replayed when the comparison starts. The standby follows the same vault,
   so after a restore to the newest state both hold the same rows; on a busy
   primary rows committed between the restore point and the standby's
   position show as differing ranges, which the report lists. A drill at a
   time compares like with like instead: the restore goes exactly to the LSN
   of the newest state an earlier passed drill recorded by then, and the
   tables' roots are compared with the roots recorded (``recorded_state``).
3. teardown: the scratch cluster is stopped (immediate) and removed.

Scratch clusters live under ``<tmp>/dragent-drills/`` (mode 0755 on the way
down) because the PostgreSQL OS user must reach them.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from agent.config import StreamConfig
from replicators.errors import DragentError
from replicators.keys import KeyProvider
from replicators.store import ObjectStore

SCRATCH_ROOT = Path(tempfile.gettempdir()) / "dragent-drills"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scratch_dir(drill_id: str, stream: str) -> Path:
    """A fresh directory the PostgreSQL OS user can reach (its parents are 0755)."""
    root = SCRATCH_ROOT / drill_id
    root.mkdir(parents=True, exist_ok=True)
    for path in (SCRATCH_ROOT, root):
        path.chmod(0o755)
    return root / stream


def recorded_state(entries: list[dict[str, Any]], stream: str, at: float) -> dict[str, Any] | None:
    """The newest state of ``stream`` that a passed restore drill of this region recorded
    at or before ``at``: ``{"lsn", "time", "tables" {name: root}, "seq"}``, or None. That
    drill restored the vault to ``lsn`` and found it equal, table by table, to the
    standby then: the source's state at that point, to compare a later restore with."""
    best: dict[str, Any] | None = None
    for entry in entries:
        if entry.get("type") != "drill.restore":
            continue
        for s in entry.get("data", {}).get("streams", []):
            when, lsn, tables = s.get("last_source_time"), s.get("end"), s.get("tables")
            usable = s.get("stream") == stream and s.get("ok") and s.get("equal")
            if not usable or s.get("method") != "postgres-pitr" or not lsn or not tables:
                continue
            if when is None or when > at or (best is not None and when <= best["time"]):
                continue
            roots = {name: v.get("restored") for name, v in tables.items()}
            best = {"lsn": lsn, "time": when, "tables": roots, "seq": entry.get("seq")}
    return best


async def restore_and_compare(
    stream: StreamConfig,
    store: ObjectStore,
    keys: KeyProvider,
    *,
    drill_id: str,
    at: float | None,
    result: Any,
    evidence: list[dict[str, Any]] | None = None,
) -> None:
    """Fill ``result`` (a ``StreamResult``): timings, LSNs, roots, verdict. Never leaves a
    cluster behind. Errors of the restore or the comparison become ``result.problem``.

    The newest state (``at`` None) is compared with the standby. A drill at ``at``
    compares like with like: it restores to the newest state a passed drill recorded
    at or before ``at`` (``recorded_state`` over ``evidence``), exactly to its LSN, and
    compares the tables' roots with those recorded then (never with the live copy,
    which has moved on)."""
    from replicators.postgres import standby
    from replicators.postgres.lsn import parse_lsn
    from replicators.postgres.restore import RestoreTarget, restore
    from verifiers.postgres import compare

    options = stream.postgres
    assert options is not None
    result.method = "postgres-pitr"
    reference = None if at is None else recorded_state(evidence or [], stream.name, at)
    if at is not None and reference is None:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
        result.problem = (
            f"restore: no state of {stream.name} recorded at or before {when} to compare "
            "a restore with (a drill at a time restores the newest state a passed drill "
            "recorded by then): run drills regularly (drill_schedule), or drill the newest"
        )
        return
    target = RestoreTarget(lsn=None if reference is None else parse_lsn(reference["lsn"]))
    data_dir = scratch_dir(drill_id, stream.name)
    port = _free_port()
    t = time.monotonic()
    try:
        restored = await restore(
            options, stream.name, store, keys, target=target, data_dir=data_dir, port=port,
        )  # fmt: skip
        result.seconds["restore"] = round(time.monotonic() - t, 6)
        result.segments, result.end = restored.segments, restored.lsn
        result.last_source_time = restored.replay_time
        t = time.monotonic()
        dsn = _at_port(options.dsn.reveal(), port)
        if reference is not None:
            await _compare_recorded(result, dsn, reference)
        else:
            # the standby is the reference ("primary" in the verifier's terms): compared at
            # the LSN it has replayed, which follows the vault as closely as the restore did
            report = await compare(options.dsn.reveal(), dsn, list(options.verify_tables) or None)
            _take(result, report)
        result.seconds["verify"] = round(time.monotonic() - t, 6)
    except DragentError as exc:
        phase = "verify" if "restore" in result.seconds else "restore"
        result.seconds.setdefault(phase, round(time.monotonic() - t, 6))
        result.problem = f"{phase}: {exc}"
    finally:
        t = time.monotonic()
        with contextlib.suppress(Exception):
            await standby.stop(options, data_dir)
        shutil.rmtree(data_dir.parent, ignore_errors=True)
        result.seconds["teardown"] = round(time.monotonic() - t, 6)


async def _compare_recorded(result: Any, dsn: str, reference: dict[str, Any]) -> None:
    """The restored cluster's table roots against those a drill recorded at that LSN."""
    from verifiers.postgres import table_roots

    recorded: dict[str, str | None] = reference["tables"]
    found = await table_roots(dsn, sorted(recorded))
    restored = {name: v["root"] for name, v in found.items()}
    result.tables = {t: {"restored": restored.get(t), "source": r} for t, r in recorded.items()}
    result.records = sum(int(v["rows"] or 0) for v in found.values())
    result.roots = {"restored": _combine(restored), "source": _combine(recorded)}
    result.start = f"{reference['lsn']} (recorded by evidence entry {reference['seq']})"
    differ = sorted(t for t, r in recorded.items() if restored.get(t) != r)
    result.equal = not differ and bool(recorded)
    if differ:
        result.problem = (
            f"{len(differ)} tables differ from the state recorded at {reference['lsn']}: "
            + ", ".join(differ[:5])
        )


def _at_port(dsn: str, port: int) -> str:
    """``dsn`` (a URL) pointed at the scratch cluster: same user and database, local port."""
    parts = urlsplit(dsn)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


def _take(result: Any, report: dict[str, Any]) -> None:
    """The comparison's verdict into ``result``: the standby was the verifier's "primary"
    (the reference), the restored cluster its "copy"."""
    source, restored, rows = _per_table(report)
    roots = report.get("roots", {})
    result.roots = {
        "restored": str(roots.get("copy") or _combine(restored)),
        "source": str(roots.get("primary") or _combine(source)),
    }
    result.tables = {t: {"restored": restored.get(t), "source": source.get(t)} for t in source}
    result.records = rows
    result.start = str(report.get("at", {}).get("primary_lsn"))  # the standby's, compared at
    result.equal = bool(report.get("ok")) and bool(source)
    if not result.equal:
        diffs = report.get("differences", [])
        result.problem = (
            f"{len(diffs)} differing key ranges: " + "; ".join(d["where"] for d in diffs[:5])
            if diffs
            else "no table with an integer primary key to compare"
        )


def _per_table(report: dict[str, Any]) -> tuple[dict[str, str], dict[str, str], int]:
    """(reference roots, restored roots, restored rows) per table, from either shape of
    the verifier's report: ``tables`` {name: {primary: {root, rows}, copy: {...}}}, or
    ``roots``/``counts`` keyed ``<table>@primary`` / ``<table>@copy``."""
    tables = report.get("tables")
    if isinstance(tables, dict) and tables:
        source = {t: str(v["primary"]["root"]) for t, v in tables.items()}
        restored = {t: str(v["copy"]["root"]) for t, v in tables.items()}
        return source, restored, sum(int(v["copy"]["rows"]) for v in tables.values())
    roots, counts = report.get("roots", {}), report.get("counts", {})
    source = {k.removesuffix("@primary"): v for k, v in roots.items() if k.endswith("@primary")}
    restored = {k.removesuffix("@copy"): v for k, v in roots.items() if k.endswith("@copy")}
    return source, restored, sum(v for k, v in counts.items() if k.endswith("@copy"))


def _combine(tables: dict[str, str | None]) -> str:
    """One root over the per-table roots, in table order (xxh3-128 Merkle)."""
    from verifiers.merkle import MerkleBuilder

    builder = MerkleBuilder()
    for name in sorted(tables):
        builder.add(f"{name}={tables[name]}".encode())
    return builder.root().hex()
