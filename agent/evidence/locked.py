"""Create-only writes with S3 Object Lock, where the bucket supports it.

``ObjectStore.put`` has no Object Lock parameters, so the evidence log writes
through this small client of its own (reads go through ``S3Store``). On a
bucket created with Object Lock enabled each entry is written with
``ObjectLockMode=COMPLIANCE`` and a retain-until date: nobody, not even the
bucket owner, can delete or overwrite that version before the date. Checked
on the SeaweedFS S3 server here: deleting a locked version is refused
(AccessDenied); deleting without a version id only adds a delete marker,
which ``dragent evidence verify`` reports as a removed entry.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from contextlib import AsyncExitStack
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from agent.configbase import S3Config
from replicators.s3 import classify, s3_client


class LockedWriter:
    """Create-only puts into one bucket, locked when the bucket has Object Lock."""

    def __init__(self, cfg: S3Config, client: Any, stack: AsyncExitStack) -> None:
        self.cfg = cfg
        self._client = client
        self._stack = stack
        self._deadline = (cfg.connect_timeout + cfg.read_timeout) * cfg.max_attempts
        self.locked: bool | None = None

    @classmethod
    async def open(cls, cfg: S3Config) -> LockedWriter:
        stack = AsyncExitStack()
        client = await stack.enter_async_context(s3_client(cfg))
        return cls(cfg, client, stack)

    async def _call(self, key: str, op: str, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(self._deadline):
                return await getattr(self._client, op)(Bucket=self.cfg.bucket, **kwargs)
        except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
            raise classify(exc, key) from exc

    async def lock_enabled(self) -> bool:
        """Whether the bucket has Object Lock enabled (cached after the first answer)."""
        if self.locked is None:
            try:
                async with asyncio.timeout(self._deadline):
                    out = await self._client.get_object_lock_configuration(Bucket=self.cfg.bucket)
                enabled = out.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
                self.locked = enabled == "Enabled"
            except ClientError:
                self.locked = False  # ObjectLockConfigurationNotFoundError, or not implemented
        return self.locked

    async def put(self, key: str, data: bytes, *, retain_seconds: float) -> bool:
        """Publish ``data`` at ``key`` once; return whether it is under Object Lock.

        Raises ``AlreadyExists`` if the key exists, else the store's errors.
        """
        extra: dict[str, Any] = {"IfNoneMatch": "*", "ContentType": "application/json"}
        locked = await self.lock_enabled()
        if locked:
            until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=retain_seconds)
            extra |= {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until}
        await self._call(key, "put_object", Key=self.cfg.prefix + key, Body=data, **extra)
        return locked

    async def aclose(self) -> None:
        await self._stack.aclose()
