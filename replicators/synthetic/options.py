"""``[streams.synthetic]``: the generator's rate and record shape."""

from __future__ import annotations

from pydantic import Field

from replicators.settings import Section


class SyntheticOptions(Section):
    """``[streams.synthetic]``: how fast records come and what they look like."""

    rate: float = Field(default=200.0, gt=0, description="records per second")
    record_size: int = Field(default=512, ge=16, le=16 * 1024 * 1024)
    compressible: bool = True
