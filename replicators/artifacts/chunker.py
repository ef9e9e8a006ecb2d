"""Content-defined chunking (FastCDC) and chunk ids (SHA-256) for the artifacts kind.

A file is cut with FastCDC (``pyfastcdc``, the 2020 algorithm) so that an edit
moves chunk boundaries only near the edit: a new checkpoint that changes some
tensors shares every other chunk with the last one. A chunk's id is the
SHA-256 of its bytes (docs/artifacts.md, "Chunk ids", gives the collision
argument). Synchronous; reads the file as a stream (pyfastcdc's
``cut_stream``), so memory stays bounded by the chunks being hashed.

The chunker itself is the core's (``replicators/chunking.py``, shared with the
postgres kind's base backups); this module names it for the artifacts kind.
"""

from __future__ import annotations

from replicators.chunking import HASH_NAME, ID_SIZE, Chunker, Piece, Readable, chunk_id

__all__ = ["HASH_NAME", "ID_SIZE", "Chunker", "Piece", "Readable", "chunk_id"]
