"""``[streams.postgres]``: where the primary is, and how the standby and backups are kept."""

from __future__ import annotations

from pathlib import Path

from pydantic import ByteSize, Field

from replicators.settings import Duration, PositiveDuration, SecretRef, Section


class PostgresOptions(Section):
    dsn: SecretRef
    """Connection string of this region's PostgreSQL: the primary on the active side (WAL
    source, heartbeats, base backups), the standby on the passive side (replay lag)."""
    slot: str | None = Field(default=None, pattern=r"^[a-z0-9_]{1,63}$")
    """Replication slot name; default ``dragent_<peer>`` (one slot per destination)."""
    sample_interval: PositiveDuration = 0.1
    """How often the source samples (insert LSN, wall time) on the primary (RPO resolution)."""
    heartbeat_interval: PositiveDuration = 5.0
    """How often a heartbeat message is written into the WAL, so an idle primary still
    produces WAL that carries source times (what a restore to a time, and the passive
    side's view of the source, can rely on). It is all an idle stream ships, so it sets
    the idle cost: one segment per interval (plus PostgreSQL's own running-transactions
    record, logged at most every 15 s after any WAL). Default: the default RPO target,
    5 s. The RPO of an idle stream does not depend on it: it is proven from the primary's
    insert position, sampled every ``sample_interval``."""
    slot_warn_bytes: ByteSize = ByteSize(1024**3)
    """Warn when the slot retains more WAL than this on the primary."""
    spool_dir: Path | None = None
    """Passive side: where WAL files are rebuilt from the vault (default under the stream's
    state directory). Must be readable by the PostgreSQL OS user."""
    standby_data_dir: Path | None = None
    """Passive side: data directory of the warm standby built by ``dragent standby init``."""
    standby_port: int = Field(default=5433, ge=1, le=65535)
    backup_every: Duration = 0.0
    """Active side: take a base backup into each destination vault this often (0 = never)."""
    backup_full_every: int = Field(default=7, ge=1)
    """A base backup reuses the chunks of the newest one (incremental) unless that one
    already reads packs of this many backups: then it is full. This bounds how far back
    a backup's packs reach, so retention can free the packs of expired backups (a chain
    of incrementals never broken would keep the first backup's packs for ever)."""
    backup_part_bytes: ByteSize = ByteSize(8 * 1024 * 1024)
    """A base backup's tar stream is cut into sealed parts of this size."""
    synchronous: bool = False
    """Zero-loss mode: the agent lists its slot in the primary's synchronous_standby_names,
    so a commit is acknowledged only once its WAL is durable in the destination vault."""
    synchronous_fallback_after: Duration = 0.0
    """With ``synchronous``: fall back to asynchronous commits (with an error log and
    ``dragent_pg_synchronous`` 0) after the agent has not acknowledged for this long;
    0 = never (commits block until the agent is back)."""
    verify_dsn: SecretRef | None = None
    """The copy ``dragent verify`` compares this region's database with (a standby or a
    restored copy); the comparison runs at the same LSN."""
    verify_tables: list[str] = []
    """Tables to verify (default: every table with a single integer primary key)."""
    os_user: str = "postgres"
    """The OS user PostgreSQL programs run as when the agent runs as root."""
    bin_dir: Path | None = None
    """PostgreSQL's program directory (default: the newest /usr/lib/postgresql/*/bin)."""
