"""The evidence log of one region, in that region's vault (I/O over ``chain``).

``EvidenceLog.open(agent_config)`` gives the region's own log (writable:
it holds the region's report-signing key); ``EvidenceLog.reader(region,
s3_config)`` a peer's, read-only. Appends are serialised in the process and
create-only in the store, so two writers (the daemon and a CLI drill) never
overwrite each other: the loser re-reads the tail and tries the next seq.
The writer keeps the last (seq, hash) it wrote in ``<data_dir>/evidence-head.json``;
``verify`` uses it to notice a removed tail.

Before it appends, the writer checks that its key is the one that signs the
chain now (the genesis entry's, or the last ``signing-key.change``'s; the
log is read whole once, then only what is new): an agent holding another
key raises ``SigningKeyError`` and writes nothing, instead of adding entries
no one can verify. The key file is re-read once when it does not match, so a
running agent takes a key installed by ``dragent evidence rotate-signing-key``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.evidence.chain import (
    KEY_CHANGE,
    PREFIX,
    ZERO,
    ChainReport,
    Signer,
    SigningKeyError,
    check_chain,
    digest,
    entry_key,
    follow,
    genesis,
    key_change_data,
    make_entry,
    parse_key,
)
from agent.evidence.keys import read_private_key, same_key
from agent.evidence.locked import LockedWriter
from replicators.errors import AlreadyExists, IntegrityError, NotFound
from replicators.s3 import S3Store
from replicators.settings import S3Config
from verifiers.report import key_id, load_or_create_signing_key

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
        key_path: Path | None = None,
    ) -> None:
        self.region = region
        self.store = store
        self._writer = writer
        self._key = key
        self._key_path = key_path  # re-read when ``key`` is not the chain's
        self._head_path = head_path
        self.retention = retention
        self._lock = asyncio.Lock()
        self._tail: tuple[int, str] | None = None  # (seq, hash) of the last entry known
        self._signer: Signer | None = None  # the chain's key, as of the entries read

    @classmethod
    async def open(cls, cfg: Any, *, key: Ed25519PrivateKey | None = None) -> EvidenceLog:
        """The writable log of ``cfg.region`` (an ``AgentConfig``) in ``cfg.vault``, signed
        with the configured key (created if there is none yet) or with ``key``."""
        key_path = None
        if key is None:
            key_path = cfg.signing_key_path
            key = load_or_create_signing_key(key_path)
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
            key_path=key_path,
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

        Raises ``SigningKeyError`` (nothing written) if this writer's key is not
        the chain's current key, ``IntegrityError`` if the head this writer
        recorded last is missing or changed in the store (a removed tail is
        never papered over by new entries), ``AlreadyExists`` after repeated
        races, and the store's errors.
        """
        if kind == KEY_CHANGE:
            raise ValueError(f"{KEY_CHANGE} entries are written by introduce_key()")
        return await self._append(kind, lambda _: data, at)

    async def introduce_key(self, new: Ed25519PublicKey, *, reason: str = "") -> dict[str, Any]:
        """Append the ``signing-key.change`` entry, signed by this writer's (current) key,
        that makes ``new`` the chain's key from the next entry on; return it. From
        then on this writer refuses to append until its key file holds the new key."""
        return await self._append(KEY_CHANGE, lambda old: key_change_data(old, new, reason), None)

    async def _append(self, kind: str, data: Any, at: float | None) -> dict[str, Any]:
        if self._writer is None or self._key is None:
            raise IntegrityError("read-only evidence log", where=self.prefix)
        async with self._lock:
            for _ in range(_APPEND_ATTEMPTS):
                seq, prev = await self._next()
                now = time.time() if at is None else at
                if seq == 0:
                    entry, raw = genesis(self.region, now, self._key)
                else:
                    key = await self._signing_key(seq - 1)
                    entry, raw = make_entry(
                        region=self.region, seq=seq, prev=prev, time=now,
                        kind=kind, data=data(key.public_key()), key=key,
                    )  # fmt: skip
                try:
                    name = entry_key(self.region, seq)
                    await self._writer.put_locked(name, raw, retain_seconds=self.retention)
                except AlreadyExists:
                    self._tail = None
                    continue
                self._remember(seq, digest(raw))
                if self._signer is not None and self._signer.seq == seq - 1:
                    self._signer = follow([(name, raw)], self._signer)
                if seq > 0:
                    return entry
            raise AlreadyExists("evidence log: lost the append race repeatedly", key=self.prefix)

    async def signer(self) -> Signer:
        """The key that must sign the next entry, as of the last entry in the store (the
        whole log is read the first time, then only the entries after those read)."""
        start = self._signer
        items = await self.raw_entries(None if start is None or start.seq < 0 else start.seq)
        self._signer = follow(items, start)
        return self._signer

    async def check_signer(self) -> None:
        """Raise ``SigningKeyError`` unless this writer may append (see ``append``)."""
        if self._writer is None or self._key is None:
            raise IntegrityError("read-only evidence log", where=self.prefix)
        async with self._lock:
            signer = await self.signer()
            if signer.seq >= 0:
                await self._signing_key(signer.seq)

    async def _signing_key(self, last: int) -> Ed25519PrivateKey:
        """This writer's key if it is the chain's current one after entry ``last`` (the key
        file is re-read once if not: it may have been rotated); else ``SigningKeyError``."""
        assert self._key is not None
        signer = self._signer
        if signer is None or signer.seq < last:
            signer = await self.signer()
        mine = key_id(self._key.public_key())
        if mine == signer.key_id:
            return self._key
        if self._key_path is not None:
            fresh = await asyncio.to_thread(read_private_key, self._key_path)
            if fresh is not None and not same_key(fresh, self._key):
                if key_id(fresh.public_key()) == signer.key_id:
                    self._key = fresh
                    return fresh
                mine = key_id(fresh.public_key())
        where = self._key_path or "the key given"
        raise SigningKeyError(
            f"evidence log of {self.region}: this agent's signing key {mine} ({where}) is not "
            f"the key that signs the chain now, {signer.describe()}; nothing was written "
            "(entries signed by another key would make the chain fail verification)",
            hint=(
                f"install the chain's key {signer.key_id} at {where} (copy it from the "
                "region's other agent or its backup); to change keys on purpose, run "
                "`dragent evidence rotate-signing-key --config F --new-key NEW` where the "
                "current key is installed"
            ),
        )

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
        if self._signer is not None and self._signer.seq == (-1 if after is None else after):
            self._signer = follow(newer, self._signer)  # the same reading keeps it current
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
