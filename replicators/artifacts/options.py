"""``[streams.artifacts]``: the model store replicated, how versions are found and chunked."""

from __future__ import annotations

from pathlib import Path

from pydantic import ByteSize, Field, model_validator

from replicators.settings import Duration, PositiveDuration, S3Config, Section


class ArtifactsOptions(Section):
    root: Path
    """The model store directory (``<model>/<version>/<files>``) in this region: read on the
    active side (unless ``s3`` is set), materialized on the passive side."""
    s3: S3Config | None = None
    """``[streams.artifacts.s3]``: the active side reads the model store from this bucket
    under its ``prefix`` (``<prefix><model>/<version>/<files>``) instead of ``root``; found
    by listing it every ``scan_interval``. The passive side still materializes into
    ``root``."""
    marker: str | None = None
    """A version is complete once this file exists in its directory (e.g. ``_COMPLETE``).
    Unset: a version is complete once nothing in it changed for ``quiet_period``."""
    quiet_period: Duration = 30.0
    scan_interval: PositiveDuration = 60.0
    """The periodic full scan, the safety net under the file-system watch."""
    watch: bool = True
    """Wake up on inotify events (watchfiles) in addition to the periodic scan (a
    directory store only)."""
    chunk_min: ByteSize = ByteSize(128 * 1024)
    chunk_avg: ByteSize = ByteSize(512 * 1024)
    chunk_max: ByteSize = ByteSize(2 * 1024 * 1024)
    pack_size: ByteSize = ByteSize(15 * 1024 * 1024)
    """Chunks are packed into sealed pack objects of at most this size (plus under 1 KiB per
    MiB of framing): keep it below the vault's ``multipart_threshold`` so a pack is one PUT."""
    uploads: int = Field(default=4, ge=1, le=64)
    """Pack uploads in flight at once."""
    mirror_deletes: bool = True
    """A version removed from the store is removed at the destinations too (its manifest and
    packs stay in the vault for ``retention``). Never when the whole store looks empty."""
    retention: Duration = 7 * 24 * 3600.0
    """How long a deleted version stays restorable from the vault before GC may take its packs."""
    gc_grace: Duration = 24 * 3600.0
    """A pack no manifest references is collected only once it is older than this."""
    gc_interval: PositiveDuration = 3600.0
    """How often the active side looks for unreferenced packs in each destination vault."""

    @model_validator(mode="after")
    def _chunk_sizes(self) -> ArtifactsOptions:
        if not 64 <= self.chunk_min <= 1 << 20:
            raise ValueError("chunk_min must be 64B..1MiB")
        if not 256 <= self.chunk_avg <= 4 << 20:
            raise ValueError("chunk_avg must be 256B..4MiB")
        if not max(1024, self.chunk_avg) <= self.chunk_max <= 16 << 20:
            raise ValueError("chunk_max must be at least chunk_avg and at most 16MiB")
        if self.chunk_min > self.chunk_avg:
            raise ValueError("chunk_min must not exceed chunk_avg")
        if self.pack_size < self.chunk_max:
            raise ValueError("pack_size must be at least chunk_max")
        if self.s3 is not None and self.s3.prefix and not self.s3.prefix.endswith("/"):
            raise ValueError(
                f"s3.prefix {self.s3.prefix!r} must end with '/' (the model store is "
                "<prefix><model>/<version>/<files>)"
            )
        return self
