"""The evidence log: drills, verifications, failovers, key rotations and RPO samples,
hash-chained and signed, in each region's vault (docs/vault-layout.md, "Evidence log")."""

from agent.evidence.chain import (
    FORMAT,
    ChainReport,
    SigningKeyError,
    check_chain,
    digest,
    encode,
    entry_key,
)
from agent.evidence.log import EvidenceLog

__all__ = [
    "FORMAT",
    "ChainReport",
    "EvidenceLog",
    "SigningKeyError",
    "check_chain",
    "digest",
    "encode",
    "entry_key",
]
