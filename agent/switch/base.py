"""The switch interface and its construction from ``[[failover.switches]]``.

A switch moves traffic to a region: ``point_to(region, epoch)`` is idempotent and
raises ``SwitchError`` naming the provider and what was refused;
``describe()`` names it for logs and records (never a secret).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from replicators.errors import DragentError


class SwitchError(DragentError):
    """A traffic switch failed."""


class StaleEpoch(SwitchError):
    """The switch was made under a newer epoch than the one asking: refused."""


class Switch(Protocol):
    """``point_to(region, epoch)``: ``epoch`` is the fencing token of the region
    asking; a provider that can record it refuses an older one (``StaleEpoch``),
    the others pass it on (``{epoch}`` in an exec argument, ``"epoch"`` in a
    webhook body). ``None``: a person or a test, no check."""

    def describe(self) -> str: ...

    async def point_to(self, region: str, epoch: int | None = None) -> None: ...


def record_value(records: Mapping[str, str], region: str) -> str:
    try:
        return records[region]
    except KeyError:
        raise SwitchError(f"no record value configured for region {region!r}") from None
