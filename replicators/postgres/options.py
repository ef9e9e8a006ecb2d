"""``[streams.postgres]``: where the primary is and how the standby is kept."""

from __future__ import annotations

from agent.configbase import SecretRef, Section


class PostgresOptions(Section):
    dsn: SecretRef
    """Connection string of the primary (source side) or of the standby (target side)."""
