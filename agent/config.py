"""The agent's configuration: one TOML file per region, parsed at the edge.

``load_config(path)`` returns a frozen, validated ``AgentConfig`` or raises
``ConfigError`` listing every problem at once, each as ``FILE: key.path:
reason``. Secrets are never written in the file itself: a secret field holds
``env:NAME`` or ``file:PATH`` and is resolved at load time into a ``Secret``
whose repr is redacted. Durations accept seconds or ``"200ms"``, ``"5s"``,
``"2m"``, ``"1h"``; sizes accept bytes or ``"8MiB"``.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import ByteSize, Field, ValidationError, field_validator, model_validator

from agent.failover_config import EtcdConfig, FailoverConfig, fencing_budget
from agent.policy_config import PolicyConfig
from replicators.artifacts.options import ArtifactsOptions
from replicators.errors import DragentError
from replicators.objects.options import ObjectsOptions
from replicators.partitions import MAX_PARTITIONS, check_count
from replicators.postgres.options import PostgresOptions
from replicators.settings import (
    Duration,
    KeysConfig,
    Name,
    PositiveDuration,
    RetentionConfig,
    S3Config,
    Secret,
    SecretRef,
    Section,
)
from replicators.synthetic import SyntheticOptions

__all__ = [
    "AgentConfig",
    "ConfigError",
    "Duration",
    "KeysConfig",
    "S3Config",
    "Secret",
    "SecretRef",
    "Section",
    "load_config",
    "parse_config",
]


class ConfigError(DragentError):
    """The configuration is invalid. ``problems`` holds one line per problem."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


class PeerConfig(Section):
    """Another region: where its vault is and which key wraps what we send it."""

    name: Name
    agent_url: str | None = None
    vault: S3Config
    keys: KeysConfig


StreamKindName = Literal["synthetic", "postgres", "objects", "artifacts"]


class StreamConfig(Section):
    """One stream. Its kind's options live in the table named after the kind."""

    name: Name
    kind: StreamKindName
    segment_max_bytes: ByteSize = ByteSize(8 * 1024 * 1024)
    segment_max_age: PositiveDuration = 0.2
    segments_in_flight: int | None = Field(default=None, ge=1, le=64)
    """Segments whose PUT may be in flight at once, acknowledged in order (pipelining):
    default 4 in zero-loss mode (``[streams.postgres] synchronous``), so a commit waits
    about one PUT, and for objects streams (throughput); else 1."""
    synthetic: SyntheticOptions = SyntheticOptions()
    postgres: PostgresOptions | None = None
    objects: ObjectsOptions | None = None
    artifacts: ArtifactsOptions | None = None
    retention: RetentionConfig | None = None
    """This stream's retention; default: the agent's ``[retention]``."""
    partitions: int = Field(default=1, ge=1, le=MAX_PARTITIONS)
    """Objects streams: the key space cut into this many partitions (a power of two),
    each a log of its own that one agent of the region's group owns at a time
    (``[group]``, ``replicators.partitions``). 1: the stream is one log."""

    @model_validator(mode="after")
    def _partitions(self) -> StreamConfig:
        if self.partitions == 1:
            return self
        if self.kind != "objects":
            raise ValueError(
                f"partitions: only objects streams are partitioned (a {self.kind} stream is "
                "one partition, owned by one agent of the group)"
            )
        check_count(self.partitions)
        events = self.objects.events if self.objects else "none"
        if events in ("sqs", "webhook"):
            raise ValueError(
                f"partitions: events = {events!r} delivers each change to one receiver; a "
                "partitioned stream takes 'filer' events or the scan alone ('none')"
            )
        return self

    @property
    def in_flight(self) -> int:
        if self.segments_in_flight is not None:
            return self.segments_in_flight
        if self.kind == "objects":
            return 4
        return 4 if self.postgres is not None and self.postgres.synchronous else 1

    @model_validator(mode="after")
    def _pipelined_kinds(self) -> StreamConfig:
        pipelined = ("postgres", "synthetic", "objects")
        if (self.segments_in_flight or 1) > 1 and self.kind not in pipelined:
            raise ValueError(
                f"segments_in_flight > 1 is supported for postgres, objects and synthetic "
                f"streams only; "
                f"the {self.kind} source expects each segment acknowledged before the next"
            )
        return self

    @model_validator(mode="after")
    def _kind_options(self) -> StreamConfig:
        if self.kind != "synthetic" and getattr(self, self.kind) is None:
            raise ValueError(f"kind {self.kind!r} needs a [streams.{self.kind}] table")
        return self


class HttpConfig(Section):
    listen: str = "127.0.0.1:7070"
    token: SecretRef | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError("expected HOST:PORT")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> HttpConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        return self


class GroupConfig(Section):
    """``[group]``: several agents of one region sharing its streams' partitions through
    etcd (``agent.group``). Each runs with the same file and its own instance name
    (``dragent run --instance NAME``, or ``DRAGENT_INSTANCE``); its state lives in
    ``<data_dir>/members/<instance>/``."""

    enabled: bool = False
    member_ttl: PositiveDuration = 6.0
    """The membership lease: a member that dies is replaced within this; one that cannot
    renew stops its partitions after two thirds of it."""


class LogConfig(Section):
    format: Literal["json", "logfmt"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class ScrubConfig(Section):
    """``[scrub]``: the continuous scrub of this region's vault (``agent.scrub``). It goes no
    faster than any of the three allow: a full pass per ``pass_period``, at most
    ``segments_per_second`` and ``bytes_per_second``."""

    enabled: bool = True
    pass_period: PositiveDuration = 86400.0
    segments_per_second: float = Field(default=20.0, gt=0)
    bytes_per_second: ByteSize = ByteSize(4 * 1024 * 1024)

    @field_validator("bytes_per_second")
    @classmethod
    def _positive(cls, value: ByteSize) -> ByteSize:
        if value <= 0:
            raise ValueError("must be more than 0 bytes")
        return value


class AgentConfig(Section):
    """One region's agent."""

    region: Name
    role: Literal["active", "passive"] = "passive"
    data_dir: Path
    vault: S3Config
    keys: KeysConfig
    peers: list[PeerConfig] = []
    streams: list[StreamConfig] = []
    http: HttpConfig = HttpConfig()
    etcd: EtcdConfig = EtcdConfig()
    failover: FailoverConfig = FailoverConfig()
    log: LogConfig = LogConfig()
    policy: PolicyConfig = PolicyConfig()
    scrub: ScrubConfig = ScrubConfig()
    retention: RetentionConfig = RetentionConfig()
    """Every stream's retention unless the stream sets its own."""
    group: GroupConfig = GroupConfig()
    instance: Name | None = None
    """This agent's name in its region's group (set by ``--instance``, not in the file)."""
    drain_timeout: PositiveDuration = 15.0
    sink_poll_interval: PositiveDuration = 0.1
    """How soon a sink lists its vault again after a listing that found new segments."""
    sink_idle_poll_interval: PositiveDuration = 1.0
    """The longest a sink waits between listings of a quiet vault: each empty listing
    doubles the wait from ``sink_poll_interval`` up to this (a LIST is a billed request:
    at 0.1 s a quiet stream's sink makes 36,000 an hour, at 1 s 3,600)."""
    report_signing_key: Path | None = None
    """The Ed25519 key that signs this region's reports and evidence entries (created on
    first use; default ``<data_dir>/report-signing.key``). Every agent of a region must
    use the same key: the first entry of the region's evidence log pins it."""

    @property
    def signing_key_path(self) -> Path:
        return self.report_signing_key or self.data_dir / "report-signing.key"

    @model_validator(mode="after")
    def _unique_names(self) -> AgentConfig:
        for what, names in (
            ("streams", [s.name for s in self.streams]),
            ("peers", [p.name for p in self.peers]),
        ):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what}: duplicate names {dup}")
        if self.region in {p.name for p in self.peers}:
            raise ValueError(f"peers: region {self.region!r} lists itself as a peer")
        return self

    @model_validator(mode="after")
    def _group(self) -> AgentConfig:
        if self.group.enabled and not self.etcd.endpoints:
            raise ValueError("group: enabled needs [etcd] endpoints")
        if self.group.enabled and self.failover.enabled:
            raise ValueError(
                "group: a group of agents follows a fixed role for now; set "
                "[failover] enabled = false (or run one agent per region)"
            )
        return self

    @model_validator(mode="after")
    def _fencing_budget(self) -> AgentConfig:
        budget = fencing_budget(self.failover, self.etcd)
        if not budget.ok:
            raise ValueError(f"failover: {budget.explain()}")
        return self

    def stream(self, name: str) -> StreamConfig:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(name)


def _location(loc: tuple[int | str, ...], data: Any) -> str:
    """Turn a pydantic location into a TOML key path, naming list items by their name."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            entry = node[item] if isinstance(node, list) and item < len(node) else None
            label = entry.get("name") if isinstance(entry, dict) else None
            parts[-1] = f"{parts[-1]}[{label or item}]" if parts else f"[{item}]"
        else:
            parts.append(str(item))
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts) or "(top level)"


def _problems(exc: ValidationError, data: Any) -> list[str]:
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        quiet = err["type"] in ("missing", "extra_forbidden", "secret")  # never echo a secret
        quiet = quiet or isinstance(value, dict | list)
        got = "" if quiet else f" (got {value!r})"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(f"{_location(loc, data)}: {msg}{got}")
    return out


def parse_config(data: dict[str, Any], path: str = "<config>") -> AgentConfig:
    """Validate an already-parsed TOML table. Raises ``ConfigError``."""
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, _problems(exc, data)) from None


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate one agent's TOML file. Raises ``ConfigError``."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(name, [f"cannot read: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(name, [f"not valid TOML: {exc}"]) from None
    return parse_config(data, name)


def as_member(cfg: AgentConfig, instance: str | None, listen: str | None = None) -> AgentConfig:
    """``cfg`` for one agent of its region's group: ``instance`` (else ``DRAGENT_INSTANCE``)
    names it, its state moves to ``<data_dir>/members/<instance>/`` (the region's signing
    key stays where it was: every agent of a region signs with it), ``listen`` replaces
    ``[http] listen``. Without ``[group] enabled`` only ``listen`` applies. Raises
    ``ConfigError`` for a missing or malformed instance name."""
    update: dict[str, Any] = {}
    if listen is not None:
        update["http"] = cfg.http.model_copy(update={"listen": listen})
    if cfg.group.enabled:
        name = instance or os.environ.get("DRAGENT_INSTANCE") or ""
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", name):
            raise ConfigError(
                "--instance",
                [
                    f"[group] enabled needs an instance name like 'a-1' (--instance or "
                    f"DRAGENT_INSTANCE), got {name!r}"
                ],
            )
        update |= {
            "instance": name,
            "data_dir": cfg.data_dir / "members" / name,
            "report_signing_key": cfg.signing_key_path,
        }
    return cfg.model_copy(update=update) if update else cfg
