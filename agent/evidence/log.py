"""The evidence log of one region, in that region's vault (I/O over ``chain``).

``EvidenceLog.open(agent_config)`` gives the region's own log (writable:
it holds the region's report-signing key); ``EvidenceLog.reader(region,
s3_config)`` a peer's, read-only. Appends are serialised in the process and
create-only in the store, so two writers (the daemon and a CLI drill) never
overwrite each other: the loser re-reads the tail and tries the next seq.
The writer keeps the last (seq, hash) it wrote in ``<data_dir>/evidence-head.json``;
``verify`` uses it to notice a removed tail.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.configbase import S3Config
from agent.evidence.chain import (
    PREFIX,
    ZERO,
    ChainReport,
    check_chain,
    digest,
    entry_key,
    genesis,
    make_entry,
    parse_key,
)
from agent.evidence.locked import LockedWriter
from replicators.errors import AlreadyExists, IntegrityError, NotFound
from replicators.s3 import S3Store
from verifiers.report import load_or_create_signing_key

_APPEND_ATTEMPTS = 5


class EvidenceLog:
    """One region's hash-chained evidence log. Close with ``aclose()``."""

    def __init__(
        self,
        region: str,
        store: S3Store,
        *,
        writer: LockedWriter | None = None,
        key: Ed25519PrivateKey | None = None,
        head_path: Path | None = None,
        retention: float = 400 * 86400.0,
    ) -> None:
        self.region = region
        self.store = store
        self._writer = writer
        self._key = key
        self._head_path = head_path
        self.retention = retention
        self._lock = asyncio.Lock()
        self._tail: tuple[int, str] | None = None  # (seq, hash) of the last entry known

    @classmethod
    async def open(cls, cfg: Any) -> EvidenceLog:
        """The writable log of ``cfg.region`` (an ``AgentConfig``) in ``cfg.vault``."""
        key = load_or_create_signing_key(cfg.signing_key_path)
        writer = await LockedWriter.open(cfg.vault)  # also the store it reads
        head = cfg.data_dir / "evidence-head.json"
        head.parent.mkdir(parents=True, exist_ok=True)
        return cls(
            cfg.region,
            writer,
            writer=writer,
            key=key,
            head_path=head,
            retention=cfg.policy.retention,
        )

    @classmethod
    async def reader(cls, region: str, vault: S3Config) -> EvidenceLog:
        """A read-only view of ``region``'s log in ``vault``."""
        return cls(region, await S3Store.open(vault))

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.region}/"

    # -- reading ---------------------------------------------------------------------

    async def raw_entries(self, after: int | None = None) -> list[tuple[str, bytes]]:
        """Every stored entry (key, bytes) in seq order, optionally after seq ``after``."""
        start = entry_key(self.region, after) if after is not None else None
        keys = [info.key async for info in self.store.list(self.prefix, start_after=start)]
        out = []
        for key in keys:
            if parse_key(key) is not None:
                out.append((key, await self.store.get(key)))
        return out

    async def entries(self) -> list[dict[str, Any]]:
        """Every entry, parsed (not verified: use ``verify`` for that)."""
        return [json.loads(raw) for _, raw in await self.raw_entries()]

    async def verify(self, public: Ed25519PublicKey | None = None) -> ChainReport:
        """Check the whole chain (see ``chain.check_chain``) against the local head."""
        return self.check(await self.raw_entries(), public)

    def check(
        self, items: list[tuple[str, bytes]], public: Ed25519PublicKey | None = None
    ) -> ChainReport:
        """``check_chain`` of already read entries, against the local head."""
        return check_chain(self.region, items, public=public, head=self._head())

    # -- writing ---------------------------------------------------------------------

    async def append(
        self, kind: str, data: dict[str, Any], *, at: float | None = None
    ) -> dict[str, Any]:
        """Append one signed entry; return it. Creates the genesis entry first if needed.

        Raises ``IntegrityError`` if the head this writer recorded last is
        missing or changed in the store (a removed tail is never papered over
        by new entries), ``AlreadyExists`` after repeated races, and the
        store's errors.
        """
        if self._writer is None or self._key is None:
            raise IntegrityError("read-only evidence log", where=self.prefix)
        async with self._lock:
            for _ in range(_APPEND_ATTEMPTS):
                seq, prev = await self._next()
                now = time.time() if at is None else at
                if seq == 0:
                    entry, raw = genesis(self.region, now, self._key)
                else:
                    entry, raw = make_entry(
                        region=self.region, seq=seq, prev=prev, time=now,
                        kind=kind, data=data, key=self._key,
                    )  # fmt: skip
                try:
                    key = entry_key(self.region, seq)
                    await self._writer.put_locked(key, raw, retain_seconds=self.retention)
                except AlreadyExists:
                    self._tail = None
                    continue
                self._remember(seq, digest(raw))
                if seq > 0:
                    return entry
            raise AlreadyExists("evidence log: lost the append race repeatedly", key=self.prefix)

    async def ensure(self) -> None:
        """Create the genesis entry if the log is empty (idempotent)."""
        if self._writer is None or self._key is None:
            return
        async with self._lock:
            seq, _ = await self._next()
            if seq == 0:
                _, raw = genesis(self.region, time.time(), self._key)
                try:
                    await self._writer.put_locked(
                        entry_key(self.region, 0), raw, retain_seconds=self.retention
                    )
                    self._remember(0, digest(raw))
                except AlreadyExists:
                    self._tail = None

    async def lock_enabled(self) -> bool:
        return False if self._writer is None else await self._writer.lock_enabled()

    async def _next(self) -> tuple[int, str]:
        """(seq, prev hash) of the next entry, reading only what follows the known tail."""
        tail = self._tail or self._head()
        after = tail[0] if tail else None
        newer = await self.raw_entries(after)
        if newer:
            key, raw = newer[-1]
            named = parse_key(key)
            assert named is not None
            tail = (named[1], digest(raw))
        elif tail is not None and self._tail is None:
            tail = await self._confirm(tail)
        self._tail = tail
        return (0, ZERO) if tail is None else (tail[0] + 1, tail[1])

    async def _confirm(self, head: tuple[int, str]) -> tuple[int, str]:
        """The locally recorded head must still be in the store, unchanged."""
        try:
            raw = await self.store.get(entry_key(self.region, head[0]))
        except NotFound:
            raise IntegrityError(
                f"entry {head[0]} recorded in {self._head_path} is missing from the vault",
                where=self.prefix,
                hint="run `dragent evidence verify`",
            ) from None
        if digest(raw) != head[1]:
            raise IntegrityError(f"entry {head[0]} was changed", where=self.prefix)
        return head

    def _head(self) -> tuple[int, str] | None:
        if self._head_path is None or not self._head_path.exists():
            return None
        doc = json.loads(self._head_path.read_text())
        if doc.get("region") != self.region:
            return None
        return int(doc["seq"]), str(doc["hash"])

    def _remember(self, seq: int, hash_: str) -> None:
        self._tail = (seq, hash_)
        if self._head_path is None:
            return
        tmp = self._head_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"region": self.region, "seq": seq, "hash": hash_}) + "\n")
        os.replace(tmp, self._head_path)

    async def aclose(self) -> None:
        if self._writer is not None and self._writer is not self.store:
            await self._writer.aclose()
        await self.store.aclose()
