"""What the demo writes in region a besides pgbench: objects and model checkpoints."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

from replicators.s3 import S3Store
from replicators.settings import S3Config

TENSORS = 32
TENSOR_BYTES = 512 * 1024


async def put_objects(cfg: S3Config, first: int, count: int) -> None:
    """Objects ``demo-<n>.json`` of a few KiB under the stream's prefix."""
    store = await S3Store.open(cfg)
    try:
        for n in range(first, first + count):
            body = f'{{"sample": {n}, "features": [' + ",".join("0.5" for _ in range(n % 400))
            await store.put(f"demo-{n:05d}.json", (body + "]}\n").encode())
    finally:
        await store.aclose()


async def count_objects(cfg: S3Config) -> int:
    store = await S3Store.open(cfg)
    try:
        return len([i async for i in store.list("")])
    finally:
        await store.aclose()


def write_model(root: Path, model: str, version: str, changed_of: str | None = None) -> None:
    """A checkpoint of ``TENSORS`` tensors; with ``changed_of``, 10% of that version's changed.

    The marker file ``_COMPLETE`` is written last: the agent takes the version only then.
    """
    directory = root / model / version
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{model}-{version}")
    base = root / model / changed_of / "model.safetensors" if changed_of else None
    old = base.read_bytes() if base else b""
    tensors = []
    for i in range(TENSORS):
        keep = old and rng.random() >= 0.1
        chunk = old[i * TENSOR_BYTES : (i + 1) * TENSOR_BYTES] if keep else os.urandom(TENSOR_BYTES)
        tensors.append(chunk)
    (directory / "model.safetensors").write_bytes(b"".join(tensors))
    (directory / "config.json").write_text(f'{{"model": "{model}", "version": "{version}"}}\n')
    (directory / "_COMPLETE").write_text("")


def tree_digest(directory: Path) -> str | None:
    """A digest of every file's name and bytes, or None when the directory is missing."""
    if not directory.is_dir():
        return None
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "_COMPLETE"):
        h.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()
