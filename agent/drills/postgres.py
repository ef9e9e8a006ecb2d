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
   position show as differing ranges, which the report lists.
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


async def restore_and_compare(
    stream: StreamConfig,
    store: ObjectStore,
    keys: KeyProvider,
    *,
    drill_id: str,
    at: float | None,
    result: Any,
) -> None:
    """Fill ``result`` (a ``StreamResult``): timings, LSNs, roots, verdict. Never leaves a
    cluster behind. Errors of the restore or the comparison become ``result.problem``."""
    from replicators.postgres import standby
    from replicators.postgres.restore import RestoreTarget, restore
    from verifiers.postgres import compare

    options = stream.postgres
    assert options is not None
    result.method = "postgres-pitr"
    data_dir = scratch_dir(drill_id, stream.name)
    port = _free_port()
    t = time.monotonic()
    try:
        restored = await restore(
            options, stream.name, store, keys,
            target=RestoreTarget(time=at), data_dir=data_dir, port=port,
        )  # fmt: skip
        result.seconds["restore"] = round(time.monotonic() - t, 6)
        result.segments, result.end = restored.segments, restored.lsn
        result.last_source_time = restored.replay_time
        t = time.monotonic()
        dsn = _at_port(options.dsn.reveal(), port)
        # the standby is the reference ("primary" in the verifier's terms): compared at the
        # LSN it has replayed, which follows the vault as closely as the restore did
        report = await compare(options.dsn.reveal(), dsn, list(options.verify_tables) or None)
        result.seconds["verify"] = round(time.monotonic() - t, 6)
        _take(result, report)
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


def _combine(tables: dict[str, str]) -> str:
    """One root over the per-table roots, in table order (xxh3-128 Merkle)."""
    from verifiers.merkle import MerkleBuilder

    builder = MerkleBuilder()
    for name in sorted(tables):
        builder.add(f"{name}={tables[name]}".encode())
    return builder.root().hex()
