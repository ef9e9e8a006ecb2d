"""Garbage collection: delete packs no manifest references, never under a running upload.

Run by the active side, per destination, because only the source knows when
an upload may still reference a pack (its index hands out chunks of any
published pack, including packs of an interrupted upload that no manifest
names yet). One pass (``collect``):

1. read the index's upload ``generation``; stop if an upload is in progress;
2. read the destination's catalogue (the stream's log) and the packs its
   live versions reference, and those of versions deleted less than
   ``retention`` ago (still restorable);
3. list the packs; a pack no manifest references and older than ``grace``
   (by the index, or by its sealed header when the index does not know it)
   is a victim;
4. in one index transaction, refuse if an upload began since step 1,
   otherwise forget the victims (no lookup returns their chunks after this);
5. delete them.

A chunk of a victim that a later version needs is simply sent again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from replicators import logs
from replicators.artifacts.index import SourceIndex
from replicators.artifacts.packs import packs_prefix
from replicators.artifacts.restore import read_catalogue
from replicators.keys import KeyProvider
from replicators.segment import read_header
from replicators.store import ObjectStore
from replicators.vault import Vault, open_vault

if TYPE_CHECKING:
    import asyncio

    from replicators.settings import PeerSettings


@dataclass
class GcResult:
    packs: int = 0
    referenced: int = 0
    young: int = 0
    deleted: list[str] = field(default_factory=list)
    bytes_deleted: int = 0
    skipped: str | None = None


def victims(
    packs: dict[str, tuple[int, float]], referenced: set[str], now: float, grace: float
) -> list[str]:
    """Keys of packs (``{key: (size, created)}``) unreferenced and older than ``grace``."""
    return sorted(
        k for k, (_, created) in packs.items() if k not in referenced and now - created >= grace
    )


async def collect(
    store: ObjectStore,
    keys: KeyProvider,
    index: SourceIndex,
    stream: str,
    grace: float,
    retention: float = 7 * 24 * 3600.0,
) -> GcResult:
    """One collection pass (see the module docstring). Idempotent; safe to interrupt."""
    result = GcResult()
    generation = index.generation()
    if index.upload_in_progress():
        result.skipped = "an upload is in progress"
        return result
    known = await read_catalogue(Vault(store), keys, stream)
    kept = list(known.live.values()) + [
        m for m, deleted_at in known.deleted.values() if time.time() - deleted_at < retention
    ]
    referenced = {key for m in kept for key in m.packs}
    packs: dict[str, tuple[int, float]] = {}
    async for info in store.list(packs_prefix(stream)):
        created = index.pack_created(info.key)
        if created is None and info.key not in referenced:
            created = read_header(await store.get(info.key)).created_at
        packs[info.key] = (info.size, created if created is not None else time.time())
    result.packs, result.referenced = len(packs), len(referenced & set(packs))
    doomed = victims(packs, referenced, time.time(), grace)
    result.young = len(packs) - result.referenced - len(doomed)
    if not doomed:
        return result
    if not index.condemn(doomed, generation):
        result.skipped = "an upload began during the pass"
        return result
    for key in doomed:
        await store.delete(key)
        result.deleted.append(key)
        result.bytes_deleted += packs[key][0]
    return result


class Collector:
    """The background job of one (stream, destination): ``sync_once`` runs one pass."""

    def __init__(
        self, stream: str, peer: PeerSettings, state_dir: Path, grace: float, retention: float
    ) -> None:
        self.stream, self.peer, self.state_dir = stream, peer, state_dir
        self.grace, self.retention = grace, retention
        self.log = logs.get("artifacts-gc", stream=stream, peer=peer.name)

    async def recover(self) -> None:
        pass

    async def sync_once(self, stop: asyncio.Event) -> bool:
        path = self.state_dir / "source.db"
        if not path.exists():
            return False
        index = SourceIndex(path)
        try:
            async with open_vault(self.peer.vault, self.peer.keys) as (vault, keys):
                result = await collect(
                    vault.store, keys, index, self.stream, self.grace, self.retention
                )
        finally:
            index.close()
        self.log.info(
            "artifacts gc pass",
            packs=result.packs,
            deleted=len(result.deleted),
            bytes_deleted=result.bytes_deleted,
            young=result.young,
            skipped=result.skipped,
        )
        return False
