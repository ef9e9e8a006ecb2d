"""The leader lease and the epoch in etcd (aetcd).

Keys under the configured prefix (values are JSON):

``leader``            ``{"region", "epoch", "via"}``, attached to the holder's lease
``epoch``             ``{"epoch", "region"}``: the last epoch handed out and to whom
``paused``            present: automatic failover is paused cluster-wide
``last_failover``     ``{"at", "epoch", "region"}`` (wall clock, for the lockout)
``failovers/<epoch>`` the failover record of that epoch (``agent.coordination.events``)
``health/<region>``   the region's own health, with its timestamp

Every acquisition is one transaction: the leader key must be absent and the
epoch key unchanged since it was read; it bumps the epoch and writes the
leader key with a fresh lease. So two regions can never both acquire, and the
epoch is a fencing token. Every call has a deadline of ``dial_timeout``; an
etcd member without a quorum answers nothing linearizable, so a region cut
off from the majority can neither read nor renew. Errors are raised as
``EtcdUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions

from agent.failover_config import EtcdConfig, lease_seconds
from replicators.errors import DragentError


class EtcdUnavailable(DragentError):
    """No etcd member answered within the deadline (or the cluster has no quorum)."""


@dataclass(frozen=True)
class ClusterView:
    """One consistent snapshot of the coordination keys."""

    leader: str | None
    leader_epoch: int
    leader_lease: int
    epoch: int
    last_leader: str | None
    paused: bool
    last_failover: float | None
    leader_via: str | None = None
    """How the leader took the lease: "takeover" (a coordinator's transaction) or
    "switchover" (handed over by an operator's command)."""


def _endpoint(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "//" in url else f"http://{url}")
    return parts.hostname or "127.0.0.1", parts.port or 2379


def _load(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class EtcdLease:
    """This region's view of, and hold on, the leader lease. Not thread-safe;
    one coordinator owns it. ``lease_id`` is set while this process holds it."""

    def __init__(self, cfg: EtcdConfig, region: str, ttl: float) -> None:
        if not cfg.endpoints:
            raise DragentError("[etcd] endpoints is empty: failover needs an etcd cluster")
        self.cfg = cfg
        self.region = region
        self.ttl = lease_seconds(ttl)
        self.prefix = cfg.prefix.rstrip("/")
        self.lease_id: int | None = None
        self._clients = [aetcd.Client(*_endpoint(e)) for e in cfg.endpoints]
        self._current = 0

    def key(self, name: str) -> bytes:
        return f"{self.prefix}/{name}".encode()

    async def aclose(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):  # a broken channel must not mask anything
                await client.close()

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` on the current member; on failure move to the next one
        for the next call. Raises ``EtcdUnavailable``."""
        client = self._clients[self._current]
        try:
            async with asyncio.timeout(self.cfg.dial_timeout):
                return await getattr(client, method)(*args, **kwargs)
        except (TimeoutError, aetcd.exceptions.ClientError, OSError) as exc:
            self._current = (self._current + 1) % len(self._clients)
            what = type(exc).__name__
            raise EtcdUnavailable(f"etcd {method} failed ({what}: {exc})".strip()) from None

    async def view(self) -> ClusterView:
        """Read every coordination key in one transaction (linearizable)."""
        names = ("leader", "epoch", "paused", "last_failover")
        t = self._clients[self._current].transactions
        _, responses = await self._call(
            "transaction", compare=[], success=[t.get(self.key(n)) for n in names], failure=[]
        )
        kvs = [r[0][1] if r else None for r in responses]
        leader, epoch, _, last = (_load(kv.value if kv else None) for kv in kvs)
        return ClusterView(
            leader=leader.get("region"),
            leader_epoch=int(leader.get("epoch", 0)),
            leader_lease=kvs[0].lease if kvs[0] else 0,
            epoch=int(epoch.get("epoch", 0)),
            last_leader=epoch.get("region"),
            paused=kvs[2] is not None,
            last_failover=last.get("at"),
            leader_via=leader.get("via"),
        )

    async def acquire(self, expect_epoch: int) -> int | None:
        """Take the lease if nobody holds it and the epoch is still ``expect_epoch``;
        return the new epoch, or None if another region won. Revokes its fresh
        lease when it loses."""
        lease = await self._call("lease", self.ttl)
        t = self._clients[self._current].transactions
        new = expect_epoch + 1
        ekey = self.key("epoch")
        got = await self._call("get", ekey)
        if int(_load(got.value if got else None).get("epoch", 0)) != expect_epoch:
            await self._revoke(lease.id)
            return None
        same_epoch = t.mod(ekey) == got.mod_revision if got else t.version(ekey) == 0
        compare = [t.version(self.key("leader")) == 0, same_epoch]
        leader = json.dumps({"region": self.region, "epoch": new, "via": "takeover"}).encode()
        epoch = json.dumps({"epoch": new, "region": self.region}).encode()
        success = [t.put(self.key("leader"), leader, lease=lease.id), t.put(ekey, epoch)]
        won, _ = await self._call("transaction", compare=compare, success=success, failure=[])
        if not won:
            await self._revoke(lease.id)
            return None
        self.lease_id = lease.id
        return new

    async def _revoke(self, lease_id: int) -> None:
        with contextlib.suppress(EtcdUnavailable):  # else it expires by itself
            await self._call("revoke_lease", lease_id)

    def adopt(self, lease_id: int) -> None:
        """Take over renewing a lease this region's previous process held."""
        self.lease_id = lease_id

    async def renew(self) -> bool:
        """Refresh the held lease; False if etcd says it no longer exists.
        Raises ``EtcdUnavailable`` when etcd does not answer."""
        if self.lease_id is None:
            return False
        reply = await self._call("refresh_lease", self.lease_id)
        return reply is not None and reply.TTL > 0

    async def release(self) -> None:
        """Forget (and best-effort revoke) the held lease. Idempotent."""
        lease_id, self.lease_id = self.lease_id, None
        if lease_id is not None:
            await self._revoke(lease_id)

    async def put_json(self, name: str, value: dict[str, Any]) -> None:
        await self._call("put", self.key(name), json.dumps(value, sort_keys=True).encode())

    async def get_json(self, name: str) -> dict[str, Any] | None:
        got = await self._call("get", self.key(name))
        return _load(got.value) if got else None

    async def delete(self, name: str) -> None:
        await self._call("delete", self.key(name))

    async def set_paused(self, paused: bool, why: str = "") -> None:
        """Pause (or resume) automatic failover for every region."""
        if paused:
            await self.put_json("paused", {"by": self.region, "why": why})
        else:
            await self.delete("paused")
