"""RFC 2136 dynamic DNS update, signed with TSIG (dnspython).

``point_to(region, epoch)`` replaces the record set of ``name`` with the
region's value in one UPDATE message (delete the rrset, add the new record),
sent over TCP to the primary server. Idempotent. Raises ``SwitchError`` on a
refused or unanswered update, naming the server, zone and DNS rcode.

The epoch is a fencing token here too: beside the record, the TXT record
``_dragent-epoch.<name>`` holds ``epoch=N``, the epoch of the last switch. A
switch under an older epoch is refused (``StaleEpoch``) before anything is
sent, and the update itself carries a prerequisite that the TXT record is
still the one read (or still absent), so two regions racing cannot both
win: the server applies the update only if nobody switched in between, and
the loser reads again. ``epoch=None`` (a person, a test) skips the check and
leaves the TXT record as it is.
"""

from __future__ import annotations

import asyncio
import re

import dns.asyncquery
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update

from agent.failover_config import Rfc2136Switch
from agent.switch.base import StaleEpoch, SwitchError, record_value

KIND = "rfc2136"
EPOCH_LABEL = "_dragent-epoch"


def _txt(epoch: int) -> str:
    return f'"epoch={epoch}"'


class Rfc2136:
    def __init__(self, cfg: Rfc2136Switch) -> None:
        self.cfg = cfg
        self.keyring = dns.tsigkeyring.from_text({cfg.tsig_name: cfg.tsig_secret.reveal()})
        self.algorithm = dns.name.from_text(cfg.tsig_algorithm)

    def describe(self) -> str:
        return f"rfc2136 {self.cfg.name} at {self.cfg.server}:{self.cfg.port}"

    @property
    def epoch_name(self) -> dns.name.Name:
        return dns.name.from_text(f"{EPOCH_LABEL}.{self.cfg.name}")

    def message(
        self, region: str, epoch: int | None = None, seen: int | None = None
    ) -> dns.update.UpdateMessage:
        """The update; with ``epoch``, it also records it, on condition that the epoch
        record is still ``seen`` (None: still absent)."""
        cfg = self.cfg
        update = dns.update.UpdateMessage(
            cfg.zone, keyring=self.keyring, keyalgorithm=self.algorithm
        )
        if epoch is not None:
            if seen is None:
                update.absent(self.epoch_name, "TXT")
            else:
                update.present(self.epoch_name, dns.rdata.from_text("IN", "TXT", _txt(seen)))
            update.replace(self.epoch_name, cfg.ttl, "TXT", _txt(epoch))
        name = dns.name.from_text(cfg.name)
        update.replace(name, cfg.ttl, cfg.rdtype, record_value(cfg.records, region))
        return update

    async def recorded_epoch(self) -> int | None:
        """The epoch of the last switch, as the server holds it (None: never recorded)."""
        query = dns.message.make_query(self.epoch_name, "TXT")
        async with asyncio.timeout(5):
            response = await dns.asyncquery.tcp(query, self.cfg.server, port=self.cfg.port)
        for rrset in response.answer:
            for rd in rrset:
                match = re.fullmatch(r'"epoch=(\d+)"', rd.to_text())
                if match:
                    return int(match.group(1))
        return None

    async def point_to(self, region: str, epoch: int | None = None) -> None:
        """Point the name at ``region``; with ``epoch``, only if no newer epoch switched it
        (raises ``StaleEpoch``). Raises ``SwitchError``."""
        for _ in range(3):
            seen = None
            if epoch is not None:
                seen = await self._recorded()
                if seen is not None and seen > epoch:
                    raise StaleEpoch(
                        f"{self.describe()}: switched under epoch {seen}, refusing epoch {epoch}"
                    )
            rcode = await self._send(self.message(region, epoch, seen))
            if rcode in (dns.rcode.NXRRSET, dns.rcode.YXRRSET) and epoch is not None:
                continue  # someone switched between the read and the update: read again
            break
        if rcode != dns.rcode.NOERROR:
            raise SwitchError(
                f"{self.describe()}: update of zone {self.cfg.zone} refused: "
                f"{dns.rcode.to_text(rcode)}",
                hint="check the TSIG key name/secret and the zone's update-policy",
            )

    async def forget_epoch(self) -> None:
        """Delete the epoch record: for a coordination cluster whose epochs start over
        (a new etcd cluster or prefix); never while the old one is in use."""
        update = dns.update.UpdateMessage(
            self.cfg.zone, keyring=self.keyring, keyalgorithm=self.algorithm
        )
        update.delete(self.epoch_name, "TXT")
        rcode = await self._send(update)
        if rcode != dns.rcode.NOERROR:
            raise SwitchError(f"{self.describe()}: epoch record not deleted: {rcode}")

    async def _recorded(self) -> int | None:
        try:
            return await self.recorded_epoch()
        except (OSError, TimeoutError, dns.exception.DNSException) as exc:
            raise SwitchError(f"{self.describe()}: epoch not readable: {exc}") from None

    async def _send(self, update: dns.update.UpdateMessage) -> int:
        try:
            async with asyncio.timeout(10):
                response = await dns.asyncquery.tcp(update, self.cfg.server, port=self.cfg.port)
        except (OSError, TimeoutError, dns.exception.DNSException) as exc:
            raise SwitchError(f"{self.describe()}: update not answered: {exc}") from None
        return int(response.rcode())

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
