"""``[etcd]`` and ``[failover]``: coordination between regions and the witness.

Timing rules checked at load time: ``renew_interval < fence_after < lease_ttl``,
so an active region that cannot renew fences itself before its lease can
expire, and a passive region can only take over after expiry (and after its
own probes of the active region failed for ``takeover_after``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from agent.configbase import Duration, Name, PositiveDuration, SecretRef, Section


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
    lease_ttl: PositiveDuration = 10.0
    renew_interval: PositiveDuration = 1.0
    fence_after: PositiveDuration = 6.0
    probe_interval: PositiveDuration = 1.0
    probe_timeout: PositiveDuration = 1.0
    takeover_after: PositiveDuration = 5.0
    lockout: Duration = 3600.0
    max_lag: PositiveDuration = 5.0
    fencing: Literal["read-only", "stop"] = "read-only"
    stop_command: list[str] = []
    postgres_dsn: str | None = None
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
    catchup_timeout: PositiveDuration = 30.0
    # replay must stand still this long to count as caught up; a standby fed by a
    # restore_command asks again every wal_retrieve_retry_interval (5 s by default)
    catchup_settle: PositiveDuration = 0.3

    @model_validator(mode="after")
    def _timing(self) -> FailoverConfig:
        if not self.renew_interval < self.fence_after < self.lease_ttl:
            raise ValueError("expected renew_interval < fence_after < lease_ttl")
        if self.fencing == "stop" and not self.stop_command:
            raise ValueError("fencing = 'stop' needs stop_command")
        return self
