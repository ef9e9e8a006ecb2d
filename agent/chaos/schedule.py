"""The nemesis's schedule: which fault, on what, when, for how long; drawn from a seed.

Pure: `plan` only draws numbers from ``random.Random(seed)``, so a seed names
a run's faults exactly and a failing run can be replayed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FAULTS = (
    "kill",
    "pause-holder",
    "partition",
    "partition-one-way",
    "slow-link",
    "clock-skew",
    "etcd-quorum",
    "flip-byte",
    "isolate",
    "kill-region",
)

HEAL_MARGIN = 15.0  # seconds left at the end of a run for the last fault to heal and settle


@dataclass(frozen=True)
class Fault:
    """One fault: ``name`` on ``target``, from ``at`` seconds after start for ``duration`` s."""

    name: str
    target: str
    at: float
    duration: float

    @property
    def until(self) -> float:
        """When the fault is planned to heal, in seconds from start."""
        return self.at + self.duration


def validate(faults: list[str], targets: dict[str, list[str]], gap: tuple[float, float]) -> None:
    """ValueError for an unknown fault, a fault with no target, or a gap that is not positive."""
    if min(gap) <= 0:
        raise ValueError(f"gap {gap} must be positive (faults never touch, and the plan ends)")
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise ValueError(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    untargeted = [f for f in faults if not targets.get(f)]
    if untargeted:
        raise ValueError(f"no targets for faults {untargeted}")


def plan(
    seed: int,
    seconds: float,
    faults: list[str],
    targets: dict[str, list[str]],
    gap: tuple[float, float] = (8.0, 20.0),
    duration: tuple[float, float] = (3.0, 15.0),
) -> list[Fault]:
    """A seeded schedule of faults, one at a time, for a run of ``seconds``.

    Each fault starts a random ``gap`` after the previous one healed (the first
    a ``gap`` after start), lasts a random ``duration``, and targets one of
    ``targets[name]``. Every fault heals before ``seconds - HEAL_MARGIN``; the
    schedule stops at the first draw that would not. The same arguments give
    the same schedule. ValueError for unknown faults, faults without targets, or a
    gap that is not positive.
    """
    validate(faults, targets, gap)
    if not faults:
        return []
    rng = random.Random(seed)
    schedule: list[Fault] = []
    at = rng.uniform(*gap)
    while True:
        name = rng.choice(faults)
        fault = Fault(name, rng.choice(targets[name]), at, rng.uniform(*duration))
        if fault.until >= seconds - HEAL_MARGIN:
            return schedule
        schedule.append(fault)
        at = fault.until + rng.uniform(*gap)
