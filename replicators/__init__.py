"""Replication: the segment format, keys, the vault and the stream kinds."""
