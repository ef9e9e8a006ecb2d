"""The ``objects`` stream kind: an event-driven bucket mirror with Merkle anti-entropy."""
