"""Key-encryption-key (KEK) providers: data keys for sealing, unwrapping for opening.

Envelope encryption (docs/segment-format.md, "Keys"): every segment carries a
32-byte data key wrapped by the destination region's KEK, and the KEK's id.
A provider hands out a fresh data key and reuses it for up to
``data_key_reuse`` seconds, so a KMS is not called per segment; reuse is safe
because each segment derives its own key from the data key with HKDF and a
random salt. Two providers with the same shape:

- ``LocalKeyProvider`` (``"local"``): a key file with several KEK versions, one
  current; for the lab, tests and air-gapped sites.
- ``AwsKmsKeyProvider`` (``"aws-kms"``): AWS KMS ``GenerateDataKey`` and
  ``Decrypt`` through aiobotocore.

Key material never appears in a repr, a log line or an error message.

One module per provider (``local``, ``kms``), the key-file format
(``keyfile``) and the interface with its cache (``provider``); this module
builds the provider a configuration names and opens a sealed segment with it
(``unseal``).
"""

from __future__ import annotations

import asyncio
import functools

from replicators.keys.keyfile import (
    KEY_FILE_FORMAT,
    generate_key_file,
    revoke_key_version,
    rotate_key_file,
)
from replicators.keys.kms import KMS_CONTEXT, AwsKmsKeyProvider
from replicators.keys.local import LocalKeyProvider
from replicators.keys.provider import KeyProvider
from replicators.segment import OpenedSegment, open_segment, read_header
from replicators.settings import KeysConfig

_INLINE_OPEN = 256 << 10  # open smaller blobs on the loop; larger ones in a worker thread

__all__ = [
    "KEY_FILE_FORMAT",
    "KMS_CONTEXT",
    "AwsKmsKeyProvider",
    "KeyProvider",
    "LocalKeyProvider",
    "build_key_provider",
    "generate_key_file",
    "revoke_key_version",
    "rotate_key_file",
    "unseal",
]


def build_key_provider(cfg: KeysConfig) -> KeyProvider:
    """The provider ``cfg`` describes (``cfg`` is already validated)."""
    if cfg.provider == "local":
        assert cfg.key_file is not None  # guaranteed by KeysConfig validation
        return LocalKeyProvider(cfg.key_file, data_key_reuse=cfg.data_key_reuse)
    assert cfg.kms_key_id is not None
    return AwsKmsKeyProvider(
        cfg.kms_key_id,
        endpoint_url=cfg.kms_endpoint,
        region=cfg.kms_region,
        data_key_reuse=cfg.data_key_reuse,
        allowed=cfg.kms_allowed_keys,
    )


async def unseal(
    blob: bytes,
    keys: KeyProvider,
    *,
    expect_stream: str | None = None,
    expect_epoch: int | None = None,
    expect_seq: int | None = None,
) -> OpenedSegment:
    """Read the header, unwrap its data key, verify and open the segment.

    Raises ``IntegrityError`` (bad segment or wrapped key), ``KeyAccessError``
    (KEK unknown or refused) or ``Unavailable`` (key service unreachable).
    Large segments are opened in a worker thread so the event loop keeps
    running; cancelling the call abandons the result.
    """
    header = read_header(blob)
    data_key = await keys.unwrap(header.key_id, header.wrapped_key)
    opener = functools.partial(
        open_segment,
        blob,
        data_key,
        expect_stream=expect_stream,
        expect_epoch=expect_epoch,
        expect_seq=expect_seq,
    )
    return opener() if len(blob) <= _INLINE_OPEN else await asyncio.to_thread(opener)
