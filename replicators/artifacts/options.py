"""``[streams.artifacts]``: the model store replicated and where it is materialized."""

from __future__ import annotations

from pathlib import Path

from agent.configbase import Section


class ArtifactsOptions(Section):
    root: Path
    """The model store directory (``<model>/<version>/<files>``) in this region."""
