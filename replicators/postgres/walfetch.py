"""``wal-fetch``: a standby's restore_command, serving WAL files from a spool.

``wal-fetch %f %p --spool DIR`` copies WAL file ``%f`` to ``%p``:

- a WAL file wholly below the spool's applied end is copied as is;
- the WAL file holding the applied end is served up to that end and padded
  with zeros to 16 MiB, so PostgreSQL replays up to its last complete record
  and asks again (the applied end moves on as the sink applies segments);
- anything at or past the applied end, or missing, exits 1 ("not yet"), which
  PostgreSQL treats as the end of the archive for now;
- while a point-in-time restore is still filling the spool (a ``FILLING``
  marker), a file is served only once complete, waiting for it: replay runs
  while later segments are still being fetched.

The spool holds only bytes of segments that passed full verification (the
sink writes nothing else), and bytes past the recorded applied end are never
served. The result is written to a temporary name and renamed into place.

This module uses only the standard library and ``lsn.py`` so that it can run
as the PostgreSQL OS user with the system Python: it starts in tens of
milliseconds, which matters for a command PostgreSQL runs for every WAL file.
Run as ``python3 walfetch.py %f %p --spool DIR``, or ``dragent wal-fetch``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

try:
    from replicators.postgres import lsn as L
except ImportError:  # run as a script by the PostgreSQL OS user
    import lsn as L  # type: ignore[import-not-found, no-redef]

FOUND, NOT_YET, FAILED = 0, 1, 2
FILLING = "FILLING"
"""Marker file: a restore is still writing this spool; wal-fetch waits for whole files."""
FILL_WAIT = 600.0


def fetch(spool: Path, name: str, dest: Path) -> int:
    """Serve ``name`` from ``spool`` into ``dest``; returns an exit code (0, 1, 2)."""
    if L.is_history_file(name):
        source = spool / name
        if not source.exists():
            return NOT_YET
        _copy_into_place(dest, lambda out: shutil.copyfileobj(source.open("rb"), out))
        return FOUND
    try:
        _, file_start = L.parse_wal_file_name(name)
    except ValueError:
        return NOT_YET  # backup history files, .partial names: not kept here
    state = _wait_while_filling(spool, file_start)
    if state is None:
        return NOT_YET
    end = int(state["end"])
    source = spool / name
    if file_start >= end or not source.exists():
        return NOT_YET
    valid = min(L.WAL_SEGMENT_SIZE, end - file_start)
    with source.open("rb") as f:
        data = f.read(valid)
    if len(data) != valid:
        print(f"wal-fetch: {source} is shorter than its applied end", file=sys.stderr)
        return FAILED

    def write(out: object) -> None:
        out.write(data)  # type: ignore[attr-defined]
        if valid < L.WAL_SEGMENT_SIZE:
            out.write(bytes(L.WAL_SEGMENT_SIZE - valid))  # type: ignore[attr-defined]

    _copy_into_place(dest, write)
    return FOUND


def _read_state(spool: Path) -> dict[str, object] | None:
    try:
        return json.loads((spool / "state.json").read_text())
    except FileNotFoundError:
        return None


def _wait_while_filling(spool: Path, file_start: int) -> dict[str, object] | None:
    """While a restore is still filling the spool (``FILLING`` exists), wait until the
    requested file is complete: a partial file served then would end recovery early."""
    deadline = time.monotonic() + FILL_WAIT
    while (spool / FILLING).exists() and time.monotonic() < deadline:
        state = _read_state(spool)
        if state is not None and file_start + L.WAL_SEGMENT_SIZE <= int(state["end"]):  # type: ignore[call-overload]
            return state
        time.sleep(0.1)
    return _read_state(spool)


def _copy_into_place(dest: Path, write: object) -> None:
    tmp = dest.with_name(dest.name + ".wal-fetch.tmp")
    with tmp.open("wb") as out:
        write(out)  # type: ignore[operator]
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dest)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="WAL file name PostgreSQL asks for (%%f)")
    parser.add_argument("dest", help="where to write it (%%p)")
    parser.add_argument("--spool", required=True, help="the spool directory")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wal-fetch", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return fetch(Path(args.spool), args.name, Path(args.dest))
    except (OSError, ValueError, KeyError) as exc:
        print(f"wal-fetch: {args.name}: {exc}", file=sys.stderr)
        return FAILED


def install(spool: Path) -> Path:
    """Copy this script and ``lsn.py`` into ``<spool>.fetch/`` beside the spool, where the
    database's OS user can run them wherever the checkout or the virtualenv lives (a home
    directory of mode 0700, say); return the script's path. Idempotent."""
    here = Path(__file__).resolve().parent
    dest = spool.parent / f"{spool.name}.fetch"
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o755)
    for name in ("walfetch.py", "lsn.py"):
        shutil.copyfile(here / name, dest / name)
        (dest / name).chmod(0o644)
    return dest / "walfetch.py"


def restore_command(spool: Path) -> str:
    """The restore_command line serving from ``spool`` with the system Python (every
    path shell-quoted: a path with spaces or quotes survives)."""
    script = install(spool)
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    quoted = " ".join(shlex.quote(str(p)) for p in (python, script))
    return f"{quoted} %f %p --spool {shlex.quote(str(spool))}"


if __name__ == "__main__":
    sys.exit(main())
