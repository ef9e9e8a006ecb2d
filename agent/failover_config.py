"""``[etcd]`` and ``[failover]``: coordination between regions and the witness.

Timing rules checked at load time: ``renew_interval < fence_after < lease_ttl``,
and the fencing budget (``fencing_budget``): an active region that cannot
renew must have *finished* fencing itself before etcd can let its lease
expire, so a passive region can only take over after the old one stopped
writing (and after its own probes of the active region failed for
``takeover_after``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, field_validator, model_validator

from replicators.settings import (
    Duration,
    Name,
    PositiveDuration,
    SecretRef,
    Section,
    _secret_error,
)


class EtcdConfig(Section):
    """etcd members, in the order the agent tries them (its own region's first)."""

    endpoints: list[str] = []
    prefix: str = "/dragent"
    dial_timeout: PositiveDuration = 1.0


class Rfc2136Switch(Section):
    """RFC 2136 dynamic update, signed with TSIG (``tsig_secret``: base64 key)."""

    provider: Literal["rfc2136"] = "rfc2136"
    server: str
    port: int = Field(default=53, gt=0, lt=65536)
    zone: str
    name: str
    rdtype: Literal["A", "AAAA", "CNAME"] = "A"
    ttl: int = Field(default=60, ge=1)
    records: dict[Name, str]
    tsig_name: str
    tsig_secret: SecretRef
    tsig_algorithm: str = "hmac-sha256"


class Route53Switch(Section):
    """Route 53 ``ChangeResourceRecordSets`` (UPSERT) through aiobotocore."""

    provider: Literal["route53"] = "route53"
    hosted_zone_id: str
    name: str
    rdtype: Literal["A", "AAAA", "CNAME"] = "A"
    ttl: int = Field(default=60, ge=1)
    records: dict[Name, str]
    endpoint: str | None = None
    region_name: str = "us-east-1"
    access_key: SecretRef | None = None
    secret_key: SecretRef | None = None


class ExecSwitch(Section):
    """Run a program; ``{region}`` in any argument is replaced by the new region."""

    provider: Literal["exec"] = "exec"
    argv: list[str] = Field(min_length=1)
    timeout: PositiveDuration = 30.0


class WebhookSwitch(Section):
    """POST ``{"region": ..., "epoch": ...}`` to a URL (a load balancer, a mesh)."""

    provider: Literal["webhook"] = "webhook"
    url: SecretRef
    timeout: PositiveDuration = 10.0


SwitchConfig = Annotated[
    Rfc2136Switch | Route53Switch | ExecSwitch | WebhookSwitch, Field(discriminator="provider")
]


class FailoverConfig(Section):
    """Automatic failover settings (leader lease, fencing, guard rails, switches)."""

    enabled: bool = False  # the agent runs the coordinator (lease, fencing, probes)
    automatic: bool = False  # ... and takes over by itself when the rules allow
    lease_ttl: PositiveDuration = 12.0
    renew_interval: PositiveDuration = 1.0
    fence_after: PositiveDuration = 5.0
    # the deadline of one fencing attempt (read-only + ending sessions, or stop_command)
    fence_timeout: PositiveDuration = 3.0
    probe_interval: PositiveDuration = 1.0
    probe_timeout: PositiveDuration = 1.0
    takeover_after: PositiveDuration = 5.0
    lockout: Duration = 3600.0
    max_lag: PositiveDuration = 5.0
    fencing: Literal["read-only", "stop"] = "read-only"
    stop_command: list[str] = []
    # this region's database, a secret reference (env:NAME or file:PATH) like every DSN
    postgres_dsn: SecretRef | None = None
    postgres_data_dir: Path | None = None
    postgres_bin_dir: Path = Path("/usr/lib/postgresql/15/bin")
    postgres_os_user: str | None = None
    heartbeat_interval: PositiveDuration = 0.2
    peer_probes: dict[Name, list[str]] = {}
    # this region's own checks besides the heartbeat write (the object store, the
    # model store...): http(s) answers below 500, tcp:// accepts, postgresql:// queries;
    # the vault's S3 endpoint is always checked
    own_probes: list[str] = []
    switches: list[SwitchConfig] = []
    notify: list[SecretRef] = []
    # the keeper's Unix socket (agent.coordination.keeper): when set, the coordinator pets
    # it every cycle and the keeper fences PostgreSQL by itself if the agent goes silent
    keeper_socket: Path | None = None
    catchup_timeout: PositiveDuration = 30.0
    # replay must stand still this long to count as caught up; a standby fed by a
    # restore_command asks again every wal_retrieve_retry_interval (5 s by default)
    catchup_settle: PositiveDuration = 0.3
    # with several passive regions, the most caught-up one takes over (agent.coordination.
    # successor); the others defer to it while its published standing is at most this old
    successor_grace: PositiveDuration = 5.0

    @property
    def dsn(self) -> str | None:
        """``postgres_dsn`` revealed, for the code that connects (never for a message)."""
        return self.postgres_dsn.reveal() if self.postgres_dsn is not None else None

    @field_validator("peer_probes")
    @classmethod
    def _no_password_in_probes(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for region, probes in value.items():
            for probe in probes:
                if probe.startswith(("postgres://", "postgresql://")) and _has_password(probe):
                    raise _secret_error(
                        f"peer_probes.{region}: a password is written in the file; give the "
                        "DSN without it and put the password in a passfile (~/.pgpass or "
                        "PGPASSFILE)"
                    )
        return value

    @model_validator(mode="after")
    def _timing(self) -> FailoverConfig:
        if not self.renew_interval < self.fence_after < self.lease_ttl:
            raise ValueError("expected renew_interval < fence_after < lease_ttl")
        if self.fencing == "stop" and not self.stop_command:
            raise ValueError("fencing = 'stop' needs stop_command")
        return self


@dataclass(frozen=True)
class FencingBudget:
    """The worst case, in seconds after the last renewal an active region *sent*, by
    which it has fenced itself when etcd stops answering; it must stay below the
    lease's TTL as etcd grants it, less a margin.

    - ``fence_after``: silence tolerated before deciding to fence;
    - ``renew_interval``: the decision cycle that notices may start that much later
      (or ``dial_timeout``, if longer: a cycle lasts at least its failed renewal);
    - ``dial_timeout``: that cycle's renewal may hang this long first (a failed
      renewal skips the cycle's read);
    - ``fence_timeout``: the fencing itself;
    - ``margin``: 10 % of the TTL, at least 0.5 s (scheduling, a loaded host).
    """

    fence_after: float
    renew_interval: float
    dial_timeout: float
    fence_timeout: float
    lease_ttl: int

    @property
    def margin(self) -> float:
        return max(0.5, 0.1 * self.lease_ttl)

    @property
    def worst_case(self) -> float:
        cycle = max(self.renew_interval, self.dial_timeout)
        return self.fence_after + cycle + self.dial_timeout + self.fence_timeout

    @property
    def ok(self) -> bool:
        return self.worst_case + self.margin < self.lease_ttl

    def explain(self) -> str:
        return (
            f"fencing budget exceeded: fence_after {self.fence_after:g}s + renew_interval "
            f"{self.renew_interval:g}s + [etcd] dial_timeout {self.dial_timeout:g}s + "
            f"fence_timeout {self.fence_timeout:g}s + margin {self.margin:g}s = "
            f"{self.worst_case + self.margin:g}s, expected below lease_ttl "
            f"{self.lease_ttl}s: an active region cut off from etcd must have fenced itself "
            "before its lease can expire and another region promote; raise lease_ttl or "
            "lower the others"
        )


def lease_seconds(ttl: float) -> int:
    """The TTL etcd grants (whole seconds), never shorter than the one configured."""
    return max(1, math.ceil(ttl))


def fencing_budget(failover: FailoverConfig, etcd: EtcdConfig) -> FencingBudget:
    return FencingBudget(
        fence_after=failover.fence_after,
        renew_interval=failover.renew_interval,
        dial_timeout=etcd.dial_timeout,
        fence_timeout=failover.fence_timeout,
        lease_ttl=lease_seconds(failover.lease_ttl),
    )


def _has_password(dsn: str) -> bool:
    """A URL DSN with a password in its user part or in a ``password=`` parameter."""
    parts = urlsplit(dsn)
    try:
        inline = parts.password is not None
    except ValueError:
        return True  # unparseable: refuse rather than risk it
    return inline or "password" in {k.lower() for k, _ in parse_qsl(parts.query)}
