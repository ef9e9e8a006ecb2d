"""The ``postgres`` stream kind: WAL streaming, base backups, warm standby, PITR."""
