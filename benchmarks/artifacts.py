"""Synthetic model checkpoints laid out like safetensors files (tests and benchmarks).

``write_checkpoint(path, size, seed)`` writes one file: an 8-byte
little-endian header length, a JSON header naming every tensor (dtype, shape,
byte range) and the tensors' bytes, as a transformer's layers would hold them
(attention projections, MLP matrices, norms). Tensor bytes are a keystream
(AES-CTR keyed by the tensor's name and seed), so they are reproducible,
incompressible like trained fp16 weights nearly are, and cheap to make.
``changed(...)`` picks the tensors a "fine-tune" rewrites.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 2  # float16
        for d in self.shape:
            n *= d
        return n


def tensors(size: int, hidden: int = 1024) -> list[Tensor]:
    """Tensors of a decoder stack of about ``size`` bytes (fp16)."""
    out = [Tensor("embed.weight", (8192, hidden))]
    layer = 0
    while sum(t.nbytes for t in out) < size:
        p = f"layers.{layer}"
        out += [
            Tensor(f"{p}.norm1.weight", (hidden,)),
            Tensor(f"{p}.attn.q.weight", (hidden, hidden)),
            Tensor(f"{p}.attn.k.weight", (hidden, hidden)),
            Tensor(f"{p}.attn.v.weight", (hidden, hidden)),
            Tensor(f"{p}.attn.o.weight", (hidden, hidden)),
            Tensor(f"{p}.norm2.weight", (hidden,)),
            Tensor(f"{p}.mlp.up.weight", (4 * hidden, hidden)),
            Tensor(f"{p}.mlp.down.weight", (hidden, 4 * hidden)),
        ]
        layer += 1
    return out


def changed(ts: list[Tensor], fraction: float, seed: int) -> set[str]:
    """``fraction`` of the tensors (by count), chosen at random with ``seed``."""
    k = max(1, round(len(ts) * fraction))
    return {t.name for t in random.Random(seed).sample(ts, k)}


def _bytes(name: str, seed: int, n: int) -> bytes:
    key = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return enc.update(bytes(n))


def write_checkpoint(
    path: Path, size: int, seed: int = 1, rewrite: set[str] | None = None, new_seed: int = 2
) -> list[Tensor]:
    """Write a checkpoint of about ``size`` bytes; tensors in ``rewrite`` get ``new_seed``."""
    ts = tensors(size)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in ts:
        header[t.name] = {
            "dtype": "F16",
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in ts:
            f.write(_bytes(t.name, new_seed if rewrite and t.name in rewrite else seed, t.nbytes))
    return ts


def write_version(directory: Path, size: int, rewrite: set[str] | None = None) -> None:
    """A registry version directory: the weights, a config and a marker-free layout."""
    write_checkpoint(directory / "model.safetensors", size, rewrite=rewrite)
    (directory / "config.json").write_text(json.dumps({"hidden_size": 1024, "dtype": "float16"}))
