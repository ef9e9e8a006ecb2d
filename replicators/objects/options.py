"""``[streams.objects]``: the source bucket and the mirror bucket."""

from __future__ import annotations

from agent.configbase import S3Config, Section


class ObjectsOptions(Section):
    source: S3Config
    """The bucket (and prefix) replicated, in the active region."""
    mirror: S3Config
    """The ready-to-serve copy, in the passive region."""
