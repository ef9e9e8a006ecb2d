"""Route 53: ``ChangeResourceRecordSets`` with one UPSERT, through aiobotocore.

Waits for the change to be ``INSYNC`` (``GetChange`` every ``poll`` seconds); the
change and the wait together are bounded by ``within`` seconds, so a Route 53 that
does not answer fails the switch in time instead of hanging the takeover.
Credentials come from the config (SecretRef) or botocore's usual chain — for a
DR switch, pre-provisioned credentials usable from the region being activated.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from agent.failover_config import Route53Switch
from agent.switch.base import SwitchError, record_value

KIND = "route53"


class Route53:
    def __init__(self, cfg: Route53Switch, within: float = 120.0, poll: float = 1.0) -> None:
        self.cfg = cfg
        self.within = within
        self.poll = poll

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
        timeout = min(self.within, 10.0)
        config = AioConfig(
            connect_timeout=timeout, read_timeout=timeout, retries={"mode": "standard"}
        )
        args: dict[str, Any] = {"region_name": self.cfg.region_name, "config": config}
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
        status = "not sent"
        try:
            async with (
                asyncio.timeout(self.within),
                get_session().create_client("route53", **self._client_args()) as client,
            ):
                answer = await client.change_resource_record_sets(
                    HostedZoneId=self.cfg.hosted_zone_id, ChangeBatch=batch
                )
                change_id = answer["ChangeInfo"]["Id"]
                status = answer["ChangeInfo"]["Status"]
                while status != "INSYNC":
                    await asyncio.sleep(self.poll)
                    status = (await client.get_change(Id=change_id))["ChangeInfo"]["Status"]
        except (BotoCoreError, ClientError) as exc:
            raise SwitchError(f"{self.describe()}: {exc}") from None
        except TimeoutError:
            if status == "not sent":
                what = "ChangeResourceRecordSets not answered"
            else:
                what = f"change still {status}, not INSYNC,"
            raise SwitchError(f"{self.describe()}: {what} in {self.within:g}s") from None


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
