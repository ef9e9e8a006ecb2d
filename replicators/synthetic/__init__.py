"""The ``synthetic`` stream kind: records from a generator at a fixed rate.

It exists for tests, the demo and benchmarks. Record ``i`` is fully
determined by ``i`` (its body) and the time it was due, so a source that
resumes at ``i`` produces exactly the records a crashed one would have: the
vault must then hold every index exactly once, in order.

Laid out as every kind is: ``options`` (its settings table), ``records`` (the
record format), ``source``, ``target``, ``verify``, and ``kind`` (what the
registry, ``replicators.registry``, calls).
"""

from __future__ import annotations

from replicators.synthetic.options import SyntheticOptions
from replicators.synthetic.records import KIND, make_record, parse_record, read_applied_log
from replicators.synthetic.source import SyntheticSource
from replicators.synthetic.target import SyntheticTarget

__all__ = [
    "KIND",
    "SyntheticOptions",
    "SyntheticSource",
    "SyntheticTarget",
    "make_record",
    "parse_record",
    "read_applied_log",
]
