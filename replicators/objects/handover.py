"""A partition changing owner: the new owner learns from the log what was shipped.

The source's ``ShippedIndex`` says what is durable in the destination, key by key; the
scan finds deletes by it (a key shipped but no longer listed) and skips what is
unchanged. An agent that takes a partition from another has no such record of what the
other shipped (or an old one, from when it last held the partition): without it, a key
the other agent shipped and the source has since deleted would stay in the mirror for
ever. The log is the truth: ``replay`` reads the partition's log in the destination
vault and folds each key's last record into the index before the source resumes.

- a put, or the last part of a large object: the key is shipped in that state (size,
  LastModified, content hash, metadata fingerprint; the etag is not in the log, so the
  row's etag is ``index.LOGGED`` unless the index already held that very state);
- a delete: the key is not shipped (its row goes);
- a large object's parts without the last: its transfer never finished: the row says
  nothing matches (the key is captured again).

Every key whose row changed is captured again at the next scan: the source reads its
current state and ships it unless the content is what the log holds
(``ObjectsSource._same_content`` compares a ``LOGGED`` row by content hash). The replay
costs one read of every segment of the partition's log, once per take.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from replicators import logs
from replicators.keys import KeyProvider, unseal
from replicators.objects import records as rec
from replicators.objects.index import LOGGED, Entry, ShippedIndex
from replicators.vault import Vault

log = logs.get("objects")


async def last_states(
    vault: Vault, keys: KeyProvider, stream: str
) -> AsyncIterator[tuple[str, Entry | None]]:
    """Each key's state after the log's records, segment by segment, in log order (a key
    may come again later): an entry, or None (deleted, or a transfer not finished)."""
    async for ref in vault.segments(stream):
        opened = await unseal(
            await vault.get_segment(ref), keys, expect_stream=ref.stream, expect_seq=ref.seq
        )
        for raw in opened.records:
            record = rec.decode(raw)
            yield record.key, _entry(record)


def _entry(record: rec.Record) -> Entry | None:
    if isinstance(record, rec.Delete):
        return None
    head = record.head
    if isinstance(record, rec.Part) and not record.last:
        return Entry(record.key, LOGGED, 0, 0, "", "", 0)  # unfinished: matches nothing
    meta = rec.meta_fingerprint(head.content_type, head.metadata)
    return Entry(record.key, LOGGED, head.size, record.version.time_ns, head.content_hash, meta)


async def replay(index: ShippedIndex, vault: Vault, keys: KeyProvider, stream: str) -> int:
    """Fold the log of ``stream`` into ``index``; the number of rows changed."""
    last: dict[str, Entry | None] = {}
    async for key, entry in last_states(vault, keys, stream):
        last[key] = entry
    changes: list[tuple[str, Entry | None]] = []
    for key, entry in last.items():
        have = index.get(key)
        if entry is None:
            if have is not None:
                changes.append((key, None))
        elif have is None or not _same_state(have, entry):
            changes.append((key, entry))
    await asyncio.to_thread(index.commit, changes)
    log.info("partition log replayed", stream=stream, keys=len(last), changed=len(changes))
    return len(changes)


def _same_state(have: Entry, logged: Entry) -> bool:
    return (have.size, have.time_ns, have.content_hash, have.meta) == (
        logged.size,
        logged.time_ns,
        logged.content_hash,
        logged.meta,
    )
