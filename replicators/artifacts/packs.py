"""Packs: chunks sealed together into one vault object (spec: docs/artifacts.md, "Packs").

A pack is a sealed segment (docs/segment-format.md) whose records are raw
chunks, so it gets zstd (when it pays), AES-256-GCM frames under a data key
wrapped by the destination's KEK, and an xxh3 Merkle root for free. Its
identity is bound into the segment header: ``stream`` is
``<stream>:pack:<writer>`` and ``seq`` the pack number, so a pack cannot be
swapped for another under a different key. ``writer`` is a random id chosen
once by each source state, so two writers never reuse a name.

Key: ``artifacts/<stream>/packs/<writer>/<seq:012d>.pack``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from replicators.errors import IntegrityError
from replicators.keys import KeyProvider, unseal
from replicators.s3 import S3Store
from replicators.segment import DataKey, OpenedSegment, seal
from replicators.settings import S3Config

_KEY = re.compile(r"artifacts/([a-z0-9][a-z0-9-]*)/packs/([0-9a-f]{8,32})/([0-9]{12})\.pack")
FRAME_SIZE = 1 << 20


def packs_prefix(stream: str) -> str:
    return f"artifacts/{stream}/packs/"


@dataclass(frozen=True, order=True)
class PackRef:
    stream: str
    writer: str
    seq: int

    @property
    def key(self) -> str:
        return f"{packs_prefix(self.stream)}{self.writer}/{self.seq:012d}.pack"

    @property
    def sealed_stream(self) -> str:
        """The ``stream`` field of the pack's segment header."""
        return f"{self.stream}:pack:{self.writer}"

    @classmethod
    def parse(cls, key: str) -> PackRef:
        match = _KEY.fullmatch(key)
        if not match:
            raise IntegrityError(f"not a pack name: {key!r}", where="vault")
        return cls(match.group(1), match.group(2), int(match.group(3)))


async def open_pack_store(cfg: S3Config) -> S3Store:
    """The destination vault as the source writes packs and manifests into it.

    Bodies are left out of the request signature: everything written there is a
    sealed segment (AES-256-GCM frames and a Merkle root), rejected on every read if
    changed, and the server checks each body's CRC32C before storing it. On a 1 GiB
    first version this saves a SHA-256 pass per byte in this process (docs/artifacts.md,
    "Throughput").
    """
    return await S3Store.open(cfg, sign_payload=False)


def seal_pack(ref: PackRef, chunks: Sequence[bytes], data_key: DataKey) -> bytes:
    """Seal ``chunks`` (record i = chunk i) into a pack. Pure; call it in a worker thread."""
    now = time.time()
    return seal(
        chunks,
        stream=ref.sealed_stream,
        epoch=0,
        seq=ref.seq,
        start="0",
        end=str(len(chunks)),
        first_source_time=now,
        last_source_time=now,
        data_key=data_key,
        created_at=now,
        frame_size=FRAME_SIZE,
    )


async def open_pack(ref: PackRef, blob: bytes, keys: KeyProvider) -> OpenedSegment:
    """Verify a pack completely (tags, Merkle root, its identity) and return its chunks.

    Raises ``IntegrityError`` naming the pack, ``KeyAccessError`` or ``Unavailable``.
    """
    return await unseal(
        blob, keys, expect_stream=ref.sealed_stream, expect_epoch=0, expect_seq=ref.seq
    )


_FRAME_ERROR = re.compile(r"frame (\d+) failed authentication")


def damaged_records(error: IntegrityError, lengths: dict[int, int]) -> list[int] | None:
    """Which records a failed frame held, from the record lengths (``{index: length}``).

    Frames cut the length-prefixed record stream every ``FRAME_SIZE`` bytes
    (docs/segment-format.md, "Records"), so a frame that failed
    authentication maps to the records overlapping its byte range. Returns
    ``None`` when the error does not name a frame or lengths are incomplete.
    """
    match = _FRAME_ERROR.search(str(error))
    if not match or not lengths or sorted(lengths) != list(range(len(lengths))):
        return None
    frame = int(match.group(1))
    lo, hi = frame * FRAME_SIZE, (frame + 1) * FRAME_SIZE
    out, pos = [], 0
    for index in range(len(lengths)):
        end = pos + 4 + lengths[index]
        if pos < hi and end > lo:
            out.append(index)
        pos = end
    return out
