"""``dragent vault gc``: one collection of a stream in this region's vault, now.

The same pass the daemon runs every ``[retention] gc_every``
(``replicators.postgres.gc``); ``--dry-run`` lists what it would delete. PostgreSQL
streams only: an artifacts stream's packs have their own collector (its daemon job),
and an objects stream's log is every key's history, kept whole.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any

from tqdm import tqdm

from agent.config import AgentConfig, ConfigError
from agent.jsonout import print_json


async def vault_gc(cfg: AgentConfig, stream_name: str, as_json: bool, *, dry_run: bool) -> int:
    from replicators.postgres.kind import VaultGc

    stream = next((s for s in cfg.streams if s.name == stream_name), None)
    if stream is None:
        known = ", ".join(s.name for s in cfg.streams) or "none"
        raise ConfigError(f"--stream {stream_name}: no such stream (configured: {known})")
    if stream.kind != "postgres":
        raise ConfigError(
            f"--stream {stream_name}: vault gc collects postgres streams; a {stream.kind} "
            "stream is not collected by it (see dragent vault gc --help)"
        )
    job = VaultGc(stream, cfg)
    with tqdm(desc="deleting" if not dry_run else "planning", unit=" obj", file=sys.stderr,
              disable=as_json) as bar:  # fmt: skip
        result = await job.run(dry_run=dry_run, on_delete=lambda kind, key: bar.update(1))
    data = result.to_json()
    if as_json:
        print_json(data)
    else:
        print(_text(data))
    return 0


def _iso(t: float | None) -> str:
    if not t:
        return "none"
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def _text(d: dict[str, Any]) -> str:
    verb = "would delete" if d["dry_run"] else "deleted"
    kinds = ", ".join(f"{n} {k}s" for k, n in sorted(d["deleted"].items())) or "nothing"
    lines = [
        f"{d['stream']}: {verb} {kinds} ({d['bytes_deleted']} bytes)",
        f"  recovery window: {d['recovery_window']:.0f}s (policy {d['window']:.0f}s), "
        f"oldest restore point {_iso(d['oldest_point'])}",
        f"  backups kept: {', '.join(d['kept_backups']) or 'none'}"
        + (f"; in progress: {', '.join(d['in_progress'])}" if d["in_progress"] else ""),
    ]
    if d["locked"]:
        lines.append(
            f"  skipped {len(d['locked'])} objects under Object Lock, e.g. {d['locked'][0]}"
        )
    held = ", ".join(f"{k} {v} objects / {d['vault_bytes'].get(k, 0)} bytes"
                     for k, v in sorted(d["vault_objects"].items()))  # fmt: skip
    lines.append(f"  left in the vault: {held or 'nothing'}")
    return "\n".join(lines)
