"""Building blocks of the configuration shared by every section and stream kind.

``Section`` is a frozen model that forbids unknown keys; ``SecretRef`` resolves
``env:NAME`` / ``file:PATH`` at load time into a ``Secret`` whose repr is
redacted; ``Duration`` accepts seconds or ``"200ms"``, ``"5s"``, ``"2m"``,
``"1h"``. A stream kind's options (``replicators/<kind>/options.py``) are
built from these, so they import this module and never ``agent.config``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, BeforeValidator, ByteSize, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError


class Secret:
    """A resolved secret. Its repr and str never show the value."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.source}, ****)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _secret_error(message: str) -> PydanticCustomError:
    """A problem with a secret field: its error type ``secret`` keeps the value out of
    every message (``agent.config`` never echoes it)."""
    return PydanticCustomError("secret", message)


def _resolve_secret(value: Any) -> Secret:
    if isinstance(value, Secret):
        return value
    if not isinstance(value, str):
        raise _secret_error("expected a string 'env:NAME' or 'file:PATH'")
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise _secret_error(f"environment variable {name!r} is not set")
        return Secret(os.environ[name], value)
    if value.startswith("file:"):
        path = Path(value[5:])
        try:
            return Secret(path.read_text().strip(), value)
        except OSError as exc:
            raise _secret_error(f"cannot read secret file {path}: {exc.strerror}") from None
    raise _secret_error("secrets are not written in the file: expected 'env:NAME' or 'file:PATH'")


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


def _parse_duration(value: Any) -> Any:
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError("expected a duration such as 200ms, 5s, 2m, 1h or a number of seconds")
        return float(match.group(1)) * _UNITS[match.group(2)]
    return value


SecretRef = Annotated[Secret, BeforeValidator(_resolve_secret)]
Duration = Annotated[float, BeforeValidator(_parse_duration), Field(ge=0)]
PositiveDuration = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0)]
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class RetentionConfig(Section):
    """How long a vault keeps the means to restore (``[retention]``, or per stream
    ``[streams.retention]``): every point of the last ``window`` stays restorable, and at
    least ``keep_backups`` base backups are kept. What no such point needs is deleted by
    the garbage collector (``dragent vault gc``, and in the daemon every ``gc_every``)."""

    window: Duration = 7 * 86400.0
    """The recovery window: restore points this far back stay restorable (0: keep all)."""
    keep_backups: int = Field(default=2, ge=1)
    """Base backups kept whatever their age (the newest ones)."""
    gc_every: PositiveDuration = 3600.0
    """How often the daemon collects its own vault."""
    orphan_grace: Duration = 86400.0
    """A base backup without a manifest is in progress for this long after it began,
    and never collected before (a backup still being written)."""
    enabled: bool = True
    """False: the daemon never collects (``dragent vault gc`` still can)."""


class ObjectLockConfig(Section):
    """``object_lock = { mode = "GOVERNANCE", retain = "8d" }`` on a vault's S3 table: every
    object the vault writes carries an S3 Object Lock retention of ``retain`` from its
    write (docs/immutable-vault.md). The bucket must have been created with Object Lock
    enabled. ``retain`` should be at least the recovery window (``[retention] window``):
    ``dragent config check`` says so when it is shorter."""

    mode: Literal["GOVERNANCE", "COMPLIANCE"]
    """GOVERNANCE: a principal with ``s3:BypassGovernanceRetention`` may still delete;
    COMPLIANCE: nobody, the bucket's owner included, before the retain-until date."""
    retain: PositiveDuration
    """How long each written version is locked (retain-until = time of the write + this)."""


class S3Config(Section):
    """An S3 bucket: SeaweedFS or MinIO by endpoint, AWS S3 when endpoint is unset."""

    endpoint: str | None = None
    bucket: str
    prefix: str = ""
    region_name: str = "us-east-1"
    access_key: SecretRef | None = None
    secret_key: SecretRef | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    max_attempts: int = Field(default=5, ge=1, le=20)
    connect_timeout: PositiveDuration = 5.0
    read_timeout: PositiveDuration = 30.0
    multipart_threshold: ByteSize = ByteSize(16 * 1024 * 1024)
    multipart_chunk: ByteSize = ByteSize(8 * 1024 * 1024)
    max_concurrency: int = Field(default=16, ge=1, le=256)
    object_lock: ObjectLockConfig | None = None
    """Write every object under S3 Object Lock (``ObjectLockConfig``); unset: no lock."""
    data_client: Literal["obstore", "botocore"] = "obstore"
    """The client of the hot single requests (PUT, GET, ranged GET, HEAD) of
    ``S3Store`` and ``Bucket``: ``obstore`` (Rust, a third to a half of botocore's CPU
    per request; ``replicators/s3_obstore.py`` says what it leaves to botocore) or
    ``botocore`` for every request. Multipart, listings, deletes and Object Lock
    retentions always go through botocore."""

    @model_validator(mode="after")
    def _both_keys(self) -> S3Config:
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("access_key and secret_key go together (or neither: the AWS chain)")
        if self.multipart_chunk < 5 * 1024 * 1024:
            raise ValueError("multipart_chunk must be at least 5MiB (the S3 minimum part size)")
        return self


class KeysConfig(Section):
    """A key-encryption key: a local key file (lab, tests) or an AWS KMS key."""

    provider: Literal["local", "aws-kms"]
    key_file: Path | None = None
    kms_key_id: str | None = None
    kms_endpoint: str | None = None
    kms_region: str = "us-east-1"
    kms_allowed_keys: list[str] = []
    """Older KMS keys (ARNs) whose segments this region may still open; a segment sealed
    under any other key than these and ``kms_key_id`` is refused before Decrypt."""
    data_key_reuse: Duration = 300.0

    @model_validator(mode="after")
    def _provider_fields(self) -> KeysConfig:
        if self.provider == "local" and self.key_file is None:
            raise ValueError("provider 'local' needs key_file")
        if self.provider == "aws-kms" and not self.kms_key_id:
            raise ValueError("provider 'aws-kms' needs kms_key_id")
        return self


class PeerSettings(Protocol):
    """What the stream kinds read of another region's settings (``agent.config.PeerConfig``
    is one): the core never imports the agent that assembles it."""

    @property
    def name(self) -> str: ...

    @property
    def vault(self) -> S3Config: ...

    @property
    def keys(self) -> KeysConfig: ...


class StreamSettings(Protocol):
    """What the stream kinds read of one stream's settings (``agent.config.StreamConfig``):
    its name and kind, and the options table of its kind (``None`` for the others)."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def segment_max_bytes(self) -> int: ...

    @property
    def segment_max_age(self) -> float: ...

    @property
    def synthetic(self) -> Any: ...

    @property
    def postgres(self) -> Any: ...

    @property
    def objects(self) -> Any: ...

    @property
    def artifacts(self) -> Any: ...


class AgentSettings(Protocol):
    """What the stream kinds read of a region's settings (``agent.config.AgentConfig``)."""

    @property
    def region(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def data_dir(self) -> Path: ...

    @property
    def vault(self) -> S3Config: ...

    @property
    def keys(self) -> KeysConfig: ...

    @property
    def peers(self) -> Sequence[PeerSettings]: ...

    @property
    def streams(self) -> Sequence[StreamSettings]: ...
