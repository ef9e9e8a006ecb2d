"""``dragent evidence rotate-signing-key``: change the key that signs a region's evidence log.

The change is an act recorded in the chain: a ``signing-key.change`` entry,
signed by the chain's current key (the one installed at the configured
``signing_key_path``), names the new public key; only once that entry is
stored is the new private key installed in place of the old one. A run
interrupted between the two finds the entry already naming the new key and
only installs it. Without the current key nothing can be done: the chain
cannot be continued by another key (``SigningKeyError``, with what to do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.evidence.chain import SigningKeyError
from agent.evidence.keys import install_private_key, read_private_key, same_key
from agent.evidence.log import EvidenceLog
from verifiers.report import key_id

LOST_KEY_HINT = (
    "restore the chain's current key from its backup (or copy it from another agent of "
    "the region) to {path} and run the command again. If that key is lost for good, this "
    "log cannot be continued: dragent will not append to it with another key, and every "
    "agent of the region refuses to record evidence (the compliance monitor reports it). "
    "The log stays readable and verifiable up to its last entry; starting a new log (a "
    "new vault for the region) is a decision to record with your auditors, see "
    "docs/operations.md, 'Changing the signing key'"
)


@dataclass
class Rotation:
    """What ``rotate_signing_key`` did."""

    old_key_id: str | None
    new_key_id: str
    entry_seq: int | None  # the signing-key.change entry (None: the log was empty)
    appended: bool  # False: an earlier run had already recorded the change
    installed: bool  # False: the configured file already held the new key

    def summary(self, path: Any) -> str:
        if self.entry_seq is None:
            what = "the log is empty: its genesis entry will name the new key"
        elif self.appended:
            what = f"entry {self.entry_seq} (signed by {self.old_key_id}) introduces it"
        else:
            what = f"it is already the chain's key (named by entry {self.entry_seq})"
        done = "installed at" if self.installed else "already installed at"
        return f"signing key {self.new_key_id}: {what}; {done} {path}"


async def rotate_signing_key(cfg: Any, new: Ed25519PrivateKey, *, reason: str = "") -> Rotation:
    """Make ``new`` the key of ``cfg.region``'s evidence log and install it at
    ``cfg.signing_key_path`` (see the module docstring). Idempotent."""
    path = cfg.signing_key_path
    new_id = key_id(new.public_key())
    installed = read_private_key(path)
    log = await EvidenceLog.open(cfg, key=installed or new)
    try:
        signer = await log.signer()
        if signer.seq < 0:  # nothing to continue: the new key starts the log
            rotation = Rotation(None, new_id, None, False, False)
        elif signer.key_id == new_id:  # recorded by an earlier run that stopped after it
            rotation = Rotation(None, new_id, signer.since, False, False)
        elif installed is None or key_id(installed.public_key()) != signer.key_id:
            found = "no key file" if installed is None else key_id(installed.public_key())
            if same_key(installed, new):
                found += ", the new key itself: put the current key back there first"
            raise SigningKeyError(
                f"evidence log of {cfg.region}: the key that signs it now is "
                f"{signer.describe()}, but {path} holds {found}; only the current key can "
                "sign the change to a new one",
                hint=LOST_KEY_HINT.format(path=path),
            )
        else:
            entry = await log.introduce_key(new.public_key(), reason=reason)
            old_id = key_id(installed.public_key())
            rotation = Rotation(old_id, new_id, int(entry["seq"]), True, False)
    finally:
        await log.aclose()
    if not same_key(installed, new):
        install_private_key(path, new)  # only now: the entry naming it is stored
        rotation.installed = True
    return rotation
