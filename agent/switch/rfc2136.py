"""RFC 2136 dynamic DNS update, signed with TSIG (dnspython).

``point_to(region)`` replaces the record set of ``name`` with the region's
value in one UPDATE message (delete the rrset, add the new record), sent over
TCP to the primary server. Idempotent. Raises ``SwitchError`` on a refused or
unanswered update, naming the server, zone and DNS rcode.
"""

from __future__ import annotations

import asyncio

import dns.asyncquery
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update

from agent.failover_config import Rfc2136Switch
from agent.switch.base import SwitchError, record_value

KIND = "rfc2136"


class Rfc2136:
    def __init__(self, cfg: Rfc2136Switch) -> None:
        self.cfg = cfg
        self.keyring = dns.tsigkeyring.from_text({cfg.tsig_name: cfg.tsig_secret.reveal()})
        self.algorithm = dns.name.from_text(cfg.tsig_algorithm)

    def describe(self) -> str:
        return f"rfc2136 {self.cfg.name} at {self.cfg.server}:{self.cfg.port}"

    def message(self, region: str) -> dns.update.UpdateMessage:
        cfg = self.cfg
        update = dns.update.UpdateMessage(
            cfg.zone, keyring=self.keyring, keyalgorithm=self.algorithm
        )
        name = dns.name.from_text(cfg.name)
        update.replace(name, cfg.ttl, cfg.rdtype, record_value(cfg.records, region))
        return update

    async def point_to(self, region: str) -> None:
        try:
            async with asyncio.timeout(10):
                response = await dns.asyncquery.tcp(
                    self.message(region), self.cfg.server, port=self.cfg.port
                )
        except (OSError, TimeoutError, dns.exception.DNSException) as exc:
            raise SwitchError(f"{self.describe()}: update not answered: {exc}") from None
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            raise SwitchError(
                f"{self.describe()}: update of zone {self.cfg.zone} refused: "
                f"{dns.rcode.to_text(rcode)}",
                hint="check the TSIG key name/secret and the zone's update-policy",
            )

    async def current(self) -> list[str]:
        """The record set as the server answers it now (authoritative, over UDP)."""
        query = dns.message.make_query(self.cfg.name, self.cfg.rdtype)
        async with asyncio.timeout(5):
            response = await dns.asyncquery.udp(query, self.cfg.server, port=self.cfg.port)
        return sorted(rd.to_text() for rrset in response.answer for rd in rrset)

    async def check_credentials(self) -> None:
        """Readiness: an empty signed update prerequisite-free UPDATE is accepted.

        Sends an UPDATE that only asserts the zone apex exists, so nothing changes.
        Raises ``SwitchError`` if the key is refused."""
        update = dns.update.UpdateMessage(
            self.cfg.zone, keyring=self.keyring, keyalgorithm=self.algorithm
        )
        update.present(dns.name.from_text(self.cfg.zone))
        async with asyncio.timeout(5):
            response = await dns.asyncquery.tcp(update, self.cfg.server, port=self.cfg.port)
        if response.rcode() != dns.rcode.NOERROR:
            raise SwitchError(
                f"{self.describe()}: TSIG key refused: {dns.rcode.to_text(response.rcode())}"
            )
