"""A lab DNS server: BIND 9 (``named``) serving one zone open to RFC 2136 updates.

It listens on the lab's shared address (127.0.0.1, or the bridge address in a
``netns`` lab: the host's namespace, which no partition between members cuts,
as a DNS provider outside every region) at the spare port ``shared.dns``, and
serves the zone ``ZONE`` with ``RECORD`` (``app.lab.dragent.test``) pointing
at region a's address. Updates must be signed with the TSIG key ``KEY_NAME``
(hmac-sha256), whose base64 secret is in ``<root>/secrets/dns-tsig.key`` (so a
config can say ``tsig_secret = "file:..."``). Layout under ``<root>/dns``:
``named.conf``, the zone file and its journal, ``named.pid``, ``named.log``.

Each region has a distinct address in the zone (``addresses``): in a loopback
lab these are the made-up ``ADDRESSES`` (everything runs on 127.0.0.1, the
record only tells which region serves); in a ``netns`` lab, the regions' own.
"""

from __future__ import annotations

import base64
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import dns.asyncquery
import dns.exception
import dns.message

from agent.lab.network import Place
from agent.lab.processes import LabError, Server, spawn

KIND = "dns"
ZONE = "lab.dragent.test"
RECORD = f"app.{ZONE}"
KEY_NAME = "dragent-lab"
ADDRESSES = {"a": "127.0.1.1", "b": "127.0.2.1"}

_CONF = """\
options {{
    directory "{home}";
    listen-on port {port} {{ {address}; }};
    listen-on-v6 {{ none; }};
    pid-file none;
    recursion no;
    allow-query {{ any; }};
    dnssec-validation no;
    session-keyfile "{home}/session.key";
    managed-keys-directory "{home}";
}};
controls {{ }};
key "{key}" {{ algorithm hmac-sha256; secret "{secret}"; }};
zone "{zone}" {{
    type primary;
    file "{home}/{zone}.zone";
    update-policy {{ grant {key} zonesub ANY; }};
}};
"""

_ZONE = """\
$TTL 60
@   IN SOA ns.{zone}. hostmaster.{zone}. 1 60 30 600 30
@   IN NS  ns.{zone}.
ns  IN A   {server}
app IN A   {address}
"""


def find_named() -> Path:
    for candidate in (shutil.which("named"), "/usr/sbin/named"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise LabError("BIND's `named` was not found", hint="apt-get install bind9")


class BindServer(Server):
    """The lab's DNS server, under ``<root>/dns``, on ``port``."""

    kind: ClassVar[str] = KIND
    stop_timeout: ClassVar[float] = 5.0

    def __init__(
        self,
        root: Path,
        port: int,
        secrets_dir: Path,
        address: str = "127.0.0.1",
        addresses: Mapping[str, str] = ADDRESSES,
    ) -> None:
        self.home = root / "dns"
        self.port = port
        self.address = address
        self.addresses = dict(addresses)
        self.conf = self.home / "named.conf"
        self.key_file = secrets_dir / "dns-tsig.key"
        super().__init__(
            "shared",
            pid_file=self.home / "named.pid",
            log_file=self.home / "named.log",
            marker=str(self.conf),
            ports=[port],
            place=Place(address),
        )

    @property
    def name(self) -> str:
        return "dns (BIND)"

    def secret(self) -> str:
        """The TSIG secret (base64), created on first use."""
        if not self.key_file.exists():
            self.key_file.parent.mkdir(parents=True, exist_ok=True)
            self.key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
            self.key_file.chmod(0o600)
        return self.key_file.read_text().strip()

    def switch_config(self) -> dict[str, Any]:
        """A ``[[failover.switches]]`` table for this server (rfc2136)."""
        return {
            "provider": "rfc2136",
            "server": self.address,
            "port": self.port,
            "zone": ZONE,
            "name": f"{RECORD}.",
            "rdtype": "A",
            "ttl": 5,
            "records": dict(self.addresses),
            "tsig_name": KEY_NAME,
            "tsig_secret": f"file:{self.key_file}",
        }

    def _write(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        conf = _CONF.format(
            home=self.home,
            address=self.address,
            port=self.port,
            key=KEY_NAME,
            secret=self.secret(),
            zone=ZONE,
        )
        self.conf.write_text(conf)
        zone_file = self.home / f"{ZONE}.zone"
        for stale in (zone_file, zone_file.with_name(zone_file.name + ".jnl")):
            stale.unlink(missing_ok=True)
        zone = _ZONE.format(zone=ZONE, server=self.address, address=self.addresses["a"])
        zone_file.write_text(zone)

    async def start(self) -> None:
        """(Re)write the config and a fresh zone (app → region a), start named
        in the foreground, detached. Idempotent while running."""
        if self.is_running():
            return
        self._write()
        argv = [str(find_named()), "-g", "-4", "-c", str(self.conf)]
        spawn(argv, log=self.log_file, pid_file=self.pid_file)

    async def probe(self) -> bool:
        try:
            await resolve(self.port, f"{ZONE}.", "SOA", self.address)
        except (OSError, dns.exception.DNSException):
            return False
        return True


async def resolve(
    port: int, name: str = f"{RECORD}.", rdtype: str = "A", address: str = "127.0.0.1"
) -> list[str]:
    """Ask the lab's server directly (no resolver cache): the record set's values."""
    query = dns.message.make_query(name, rdtype)
    response = await dns.asyncquery.udp(query, address, port=port, timeout=1.0)
    return sorted(rd.to_text() for rrset in response.answer for rd in rrset)


def lab_dns(lab: Any) -> BindServer:
    """The DNS server of a ``Lab`` (not started by ``Lab.up``: call ``start``)."""
    net = lab.network
    addresses = {r: net.address(r) for r in ADDRESSES} if net.isolated else ADDRESSES
    return BindServer(
        lab.root, lab.port("shared", "dns"), lab.secrets_dir, net.address("shared"), addresses
    )
