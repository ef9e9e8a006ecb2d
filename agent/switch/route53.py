"""Route 53: ``ChangeResourceRecordSets`` with one UPSERT, through aiobotocore.

Waits for the change to be ``INSYNC`` (``GetChange``) within ``within`` seconds.
Credentials come from the config (SecretRef) or botocore's usual chain — for a
DR switch, pre-provisioned credentials usable from the region being activated.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from agent.failover_config import Route53Switch
from agent.switch.base import SwitchError, record_value

KIND = "route53"


class Route53:
    def __init__(self, cfg: Route53Switch, within: float = 120.0) -> None:
        self.cfg = cfg
        self.within = within

    def describe(self) -> str:
        return f"route53 {self.cfg.name} in {self.cfg.hosted_zone_id}"

    def change_batch(self, region: str, epoch: int | None = None) -> dict[str, Any]:
        cfg = self.cfg
        changes = [_upsert(cfg.name, cfg.rdtype, cfg.ttl, record_value(cfg.records, region))]
        if epoch is not None:
            name = f"_dragent-epoch.{cfg.name}"
            changes.append(_upsert(name, "TXT", cfg.ttl, f'"epoch={epoch}"'))
        return {"Comment": f"dragent: serve from {region}", "Changes": changes}

    def _client_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"region_name": self.cfg.region_name}
        if self.cfg.endpoint:
            args["endpoint_url"] = self.cfg.endpoint
        if self.cfg.access_key and self.cfg.secret_key:
            args["aws_access_key_id"] = self.cfg.access_key.reveal()
            args["aws_secret_access_key"] = self.cfg.secret_key.reveal()
        return args

    async def point_to(self, region: str, epoch: int | None = None) -> None:
        """UPSERT the record (and, with ``epoch``, a TXT record of it beside; Route 53
        has no conditional change, so the epoch is recorded, not compared)."""
        batch = self.change_batch(region, epoch)
        try:
            async with get_session().create_client("route53", **self._client_args()) as client:
                answer = await client.change_resource_record_sets(
                    HostedZoneId=self.cfg.hosted_zone_id, ChangeBatch=batch
                )
                change_id = answer["ChangeInfo"]["Id"]
                async with asyncio.timeout(self.within):
                    while answer["ChangeInfo"]["Status"] != "INSYNC":
                        await asyncio.sleep(1.0)
                        answer = await client.get_change(Id=change_id)
        except (BotoCoreError, ClientError) as exc:
            raise SwitchError(f"{self.describe()}: {exc}") from None
        except TimeoutError:
            raise SwitchError(f"{self.describe()}: change not INSYNC in {self.within:g}s") from None


def _upsert(name: str, rdtype: str, ttl: int, value: str) -> dict[str, Any]:
    return {
        "Action": "UPSERT",
        "ResourceRecordSet": {
            "Name": name,
            "Type": rdtype,
            "TTL": ttl,
            "ResourceRecords": [{"Value": value}],
        },
    }
