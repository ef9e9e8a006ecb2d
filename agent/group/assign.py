"""Who owns which partition: rendezvous (highest random weight) hashing, and the plan.

Each partition ranks the members by ``xxh3_64(member, partition)`` and belongs to its
first choice: every member computes the same answer from the same member list, with
no coordination, and when a member joins or leaves only the partitions it wins or held
move (about ``1/n`` of them); the others keep running where they are. (Bounding each
member's load instead would cascade: a member's death would move other members'
partitions too, each move a drain.) The loads vary as a binomial: with 64 partitions
over 3 members a member gets 21 ± 4; with 8, one member in eight gets none. Configure
several times more partitions than members.

``plan(me, members, held, parts)`` is what one member does next from what it sees: the
partitions to release (held but now won by another member: stop them first, then give
them up) and the ones to try to take (won and not held; a take succeeds only once the
previous owner has released the partition or its lease has expired). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

import xxhash


def weight(member: str, part: str) -> int:
    return xxhash.xxh3_64_intdigest(f"{member}\x00{part}".encode())


def ranking(part: str, members: Iterable[str]) -> list[str]:
    """The members in ``part``'s order of preference (highest weight first)."""
    return sorted(members, key=lambda m: (weight(m, part), m), reverse=True)


def owner(part: str, members: Iterable[str]) -> str | None:
    """``part``'s first choice among ``members`` (plain rendezvous; None: no member)."""
    ranked = ranking(part, members)
    return ranked[0] if ranked else None


def assignment(parts: Iterable[str], members: Collection[str]) -> dict[str, str | None]:
    return {p: owner(p, members) for p in parts}


@dataclass(frozen=True)
class Plan:
    release: frozenset[str]
    take: frozenset[str]

    @property
    def empty(self) -> bool:
        return not self.release and not self.take


def plan(me: str, members: Collection[str], held: Collection[str], parts: Iterable[str]) -> Plan:
    """What ``me`` should release and take. A member not in ``members`` (it lost its
    membership) wins nothing and releases everything it holds."""
    won = {p for p in parts if me in members and owner(p, members) == me}
    return Plan(release=frozenset(set(held) - won), take=frozenset(won - set(held)))
