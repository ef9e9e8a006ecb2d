"""dragent: the per-region disaster-recovery agent (daemon, config, CLI, HTTP, lab)."""

__version__ = "0.1.0"
