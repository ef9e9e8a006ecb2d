"""One agent's membership of its region's group, and the partitions it owns, in etcd.

Keys under ``<prefix>/group/`` (values are JSON):

``<region>/members/<instance>``  ``{"instance", "pid", "since"}``, on the member's lease
``<region>/owners/<partition>``  ``{"instance", "epoch"}``, on the owner's lease
``epochs/<partition>``           ``{"epoch", "region", "instance"}``: the last epoch of the
                                 partition's log (one counter across regions)

Every ``ttl / 6`` seconds a member renews its lease, reads the members and the owners,
and follows ``assign.plan``: it releases what another member now wins (after the
daemon has stopped those partitions: ``released()``), and takes what it wins once the
owner key is free, in one transaction that requires the key to be absent and, on the
active side, bumps the partition's epoch: the epoch is the fencing token of the
partition's log (``Shipper`` halts on a newer epoch in the log; a sink quarantines a
superseded one), so a member paused or cut off past its lease that wakes up can
neither fork the log nor have its late segments applied.

A member that has not renewed for ``fence_after`` (two thirds of the TTL) owns nothing
from then on (the daemon stops every partition at once) and joins again with a new
lease when etcd answers: before etcd can let its lease expire and give its partitions
to another member, it has stopped them.

The loop runs in a thread of its own with its own event loop (like the failover
coordinator's), so that work blocking the agent's loop (building a partition's streams,
sealing) never delays a renewal; ``owned`` is swapped whole, and ``changed()`` and
``released()`` are awaited in the agent's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Collection, Sequence
from typing import Any

from agent.coordination.lease import EtcdLease, EtcdUnavailable
from agent.coordination.thread_host import ThreadHost
from agent.failover_config import EtcdConfig
from agent.group.assign import plan
from replicators import logs

FENCE_SHARE = 2 / 3
STEP_SHARE = 1 / 6
WAKE_GAP = 0.1
"""The least time between two cycles woken by changes of the group's keys."""


class GroupMember(ThreadHost):
    """``parts`` are the partition names the group shares (``replicators.partitions``)."""

    def __init__(
        self,
        etcd: EtcdConfig,
        region: str,
        instance: str,
        ttl: float,
        parts: Sequence[str],
        *,
        active: bool,
        base_epoch: int = 1,
    ) -> None:
        self.etcd = EtcdLease(etcd, region, ttl)
        self.region = region
        self.instance = instance
        self.ttl = ttl
        self.parts = list(parts)
        self.active = active
        self.base_epoch = base_epoch
        self.members: list[str] = []
        self.owners: dict[str, str] = {}
        self.held: dict[str, int] = {}
        """Partitions whose owner key this member holds -> epoch."""
        self.owned: dict[str, int] = {}
        """Partitions this member may run now -> epoch (held, not being released)."""
        self.lease_id: int | None = None
        self.renewed_at: float | None = None
        self.fenced = False
        self.changes = 0
        self.handovers: deque[dict[str, Any]] = deque(maxlen=max(20, len(self.parts)))
        """The last takes (room for one of every partition: all a lost member ran)."""
        self.takes = 0
        self._changed = asyncio.Event()
        self.threaded = True  # ThreadHost: the loop runs in a thread of its own
        self._caller: asyncio.AbstractEventLoop | None = None
        self._grew_at = 0.0
        """When a member last joined (monotonic): takes wait a cycle's time after it."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self.log = logs.get("group", region=region, instance=instance)

    # -- keys --------------------------------------------------------------------------
    def _key(self, name: str) -> bytes:
        return self.etcd.key(f"group/{name}")

    def _member_key(self, instance: str) -> bytes:
        return self._key(f"{self.region}/members/{instance}")

    def _owner_key(self, part: str) -> bytes:
        return self._key(f"{self.region}/owners/{part}")

    def _epoch_key(self, part: str) -> bytes:
        return self._key(f"epochs/{part}")

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await self.etcd._call(method, *args, **kwargs)

    # -- the daemon's side ---------------------------------------------------------------
    async def changed(self) -> None:
        """Wait until the partitions this member may run change."""
        await self._changed.wait()
        self._changed.clear()

    def _set_owned(self, owned: dict[str, int]) -> None:
        if owned != self.owned:
            self.owned = owned
            self.changes += 1
            if self._caller is not None:
                self._caller.call_soon_threadsafe(self._changed.set)
            else:
                self._changed.set()

    async def released(self, running: Collection[str]) -> None:
        """Give up the keys of the partitions held, not owned any more, and not
        ``running`` (the daemon has stopped them), in the member's own loop (which owns
        the etcd connections)."""
        loop = self._loop
        if loop is None or self._caller is None:
            await self._release_stopped(running)
            return
        if loop.is_closed() or not loop.is_running():
            return  # the member has left: its lease is revoked
        future = asyncio.run_coroutine_threadsafe(self._release_stopped(running), loop)
        with contextlib.suppress(RuntimeError, asyncio.CancelledError):
            await asyncio.wrap_future(future)

    async def _release_stopped(self, running: Collection[str]) -> None:
        for part in [p for p in self.held if p not in self.owned and p not in running]:
            with contextlib.suppress(EtcdUnavailable):  # else its lease expires
                await self._release(part)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "instance": self.instance,
            "members": self.members,
            "owned": sorted(self.owned),
            "epochs": dict(sorted(self.owned.items())),
            "owners": dict(sorted(self.owners.items())),
            "fenced": self.fenced,
            "renewed_seconds_ago": _ago(now, self.renewed_at),
            "handovers": list(self.handovers),
        }

    # -- the loop ------------------------------------------------------------------------
    async def _run(self, stop: asyncio.Event) -> None:
        """The member's loop (``ThreadHost.run`` runs it in a thread of its own)."""
        self._loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        watcher = asyncio.create_task(self._watch(wake))
        try:
            while not stop.is_set():
                self._fence_if_late()  # first: a member that was paused stops before anything
                try:
                    await self.step()
                except EtcdUnavailable as exc:
                    self.log.warning("etcd unavailable", error=str(exc))
                self._fence_if_late()
                await self._pause(stop, wake)
        except Exception as exc:  # the loop is gone: stop everything, the lease expires
            self.log.error("group loop failed", error=f"{type(exc).__name__}: {exc}")
            self.fenced = True
            self._set_owned({})
            raise
        finally:
            watcher.cancel()
            await self.leave()

    async def _pause(self, stop: asyncio.Event, wake: asyncio.Event) -> None:
        """Until the next cycle: ``ttl * STEP_SHARE``, or sooner (not before ``WAKE_GAP``)
        when the group's keys change (a member joined or left, an owner key went)."""
        began = time.monotonic()
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
        try:
            await asyncio.wait(waits, timeout=self.ttl * STEP_SHARE, return_when="FIRST_COMPLETED")
        finally:
            for w in waits:
                w.cancel()
        wake.clear()
        rest = WAKE_GAP - (time.monotonic() - began)
        if rest > 0 and not stop.is_set():
            await asyncio.sleep(rest)

    async def _watch(self, wake: asyncio.Event) -> None:
        """Set ``wake`` at every change of this region's group keys (an etcd watch, opened
        again after any error): a lease that expires is seen at once, not a cycle later."""
        prefix = self._key(f"{self.region}/")
        while True:
            try:
                client = self.etcd._clients[self.etcd._current]
                async for _ in await client.watch_prefix(prefix):
                    wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the cycle goes on without it; try again
                self.log.debug("group watch ended", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(1.0)

    def _fence_if_late(self) -> None:
        renewed = self.renewed_at
        late = renewed is None or time.monotonic() - renewed > self.ttl * FENCE_SHARE
        if late and self.lease_id is not None and not self.fenced:
            self.log.error("lease not renewed in time: stopping every partition")
            self.fenced = True
            self._set_owned({})

    async def step(self) -> None:
        """One cycle: renew (or join), read the group, release and take."""
        sent = time.monotonic()
        if self.lease_id is not None:
            reply = await self._call("refresh_lease", self.lease_id)
            if reply is None or reply.TTL <= 0:
                self.log.error("membership lease expired: joining again")
                self._lost()
            else:
                self.renewed_at = sent
        if self.lease_id is None:
            await self._join()
            self.renewed_at = sent
        if self.fenced:  # etcd answers again: start afresh, new lease, new epochs
            with contextlib.suppress(EtcdUnavailable):
                await self._call("revoke_lease", self.lease_id)
            self._lost()
            await self._join()
            self.renewed_at = sent
        members = await self._read_members()
        # take only once no member has joined for a cycle's time: agents started together
        # see each other before taking (no partition started twice at start-up); a
        # member leaving delays nothing
        now = time.monotonic()
        if not set(members) <= set(self.members):
            self._grew_at = now
        settled = now - self._grew_at >= self.ttl * STEP_SHARE
        self.members = members
        self.owners = await self._read_owners()
        for part, who in self.owners.items():
            if part in self.held and who != self.instance:
                self.log.error("a partition this member held has another owner", partition=part)
                self.held.pop(part)
        for part in list(self.held):
            if part not in self.owners:
                self.held.pop(part)  # its key is gone (deleted by an operator)
        todo = plan(self.instance, self.members, self.held, self.parts)
        if not todo.empty:
            self.log.info(
                "rebalancing",
                members=self.members,
                release=sorted(todo.release),
                take=sorted(todo.take),
            )
        owned = {p: e for p, e in self.held.items() if p not in todo.release}
        for part in sorted(todo.take) if settled else ():
            if part in self.owners:
                continue  # still held by its previous owner: wait for its release or expiry
            epoch = await self._take(part)
            if epoch is not None:
                owned[part] = epoch
        self._set_owned(owned)

    def _lost(self) -> None:
        self.lease_id = None
        self.held.clear()
        self.fenced = False
        self._set_owned({})

    async def _join(self) -> None:
        lease = await self._call("lease", max(1, round(self.ttl)))
        value = {"instance": self.instance, "pid": os.getpid(), "since": time.time()}
        await self._call(
            "put", self._member_key(self.instance), json.dumps(value).encode(), lease=lease.id
        )
        self.lease_id = lease.id
        self.fenced = False
        self.held.clear()
        self.log.info("joined the group", lease=lease.id)

    async def leave(self) -> None:
        """Release every key (best effort) and revoke the lease: the others take over at once."""
        if self.lease_id is None:
            return
        lease_id, self.lease_id = self.lease_id, None
        with contextlib.suppress(EtcdUnavailable):
            await self._call("revoke_lease", lease_id)
        self.held.clear()
        await self.etcd.aclose()

    async def _read_members(self) -> list[str]:
        got = await self._call("get_prefix", self._key(f"{self.region}/members/"))
        return sorted(json.loads(kv.value)["instance"] for kv in got)

    async def _read_owners(self) -> dict[str, str]:
        prefix = self._key(f"{self.region}/owners/")
        got = await self._call("get_prefix", prefix)
        return {kv.key[len(prefix) :].decode(): json.loads(kv.value)["instance"] for kv in got}

    async def _take(self, part: str) -> int | None:
        """Take ``part`` if its owner key is free; its epoch, or None if another won."""
        assert self.lease_id is not None
        client = self.etcd._clients[self.etcd._current]
        t = client.transactions
        okey, ekey = self._owner_key(part), self._epoch_key(part)
        compare = [t.version(okey) == 0]
        got = await self._call("get", ekey) if self.active else None
        epoch = 0
        success = []
        if self.active:
            last = int(json.loads(got.value)["epoch"]) if got else self.base_epoch
            epoch = last + 1
            compare.append(t.mod(ekey) == got.mod_revision if got else t.version(ekey) == 0)
            record = {"epoch": epoch, "region": self.region, "instance": self.instance}
            success.append(t.put(ekey, json.dumps(record).encode()))
        value = json.dumps({"instance": self.instance, "epoch": epoch}).encode()
        success.append(t.put(okey, value, lease=self.lease_id))
        won, _ = await self._call("transaction", compare=compare, success=success, failure=[])
        if not won:
            return None
        self.held[part] = epoch
        self.takes += 1
        self.handovers.append({"partition": part, "taken_at": time.time(), "epoch": epoch})
        self.log.info("partition taken", partition=part, epoch=epoch)
        return epoch

    async def _release(self, part: str) -> None:
        epoch = self.held.get(part)
        if epoch is None:
            return  # its lease was lost meanwhile: the key went with it
        client = self.etcd._clients[self.etcd._current]
        t = client.transactions
        okey = self._owner_key(part)
        mine = json.dumps({"instance": self.instance, "epoch": epoch}).encode()
        await self._call(
            "transaction", compare=[t.value(okey) == mine], success=[t.delete(okey)], failure=[]
        )
        self.held.pop(part, None)
        self.log.info("partition released", partition=part)


def _ago(now: float, then: float | None) -> float | None:
    return None if then is None else round(now - then, 3)
