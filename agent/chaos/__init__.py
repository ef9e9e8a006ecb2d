"""Chaos runs: a seeded nemesis, a recorded history, a checker that judges it (docs/chaos.md)."""
