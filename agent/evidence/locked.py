"""Create-only writes with S3 Object Lock, where the bucket supports it.

``ObjectStore.put`` has no Object Lock parameters, so the evidence log writes
with ``LockedWriter.put_locked`` (and reads with the same store). On a
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

from botocore.exceptions import ClientError

from replicators.s3 import S3Store
from replicators.settings import S3Config


class LockedWriter(S3Store):
    """An ``S3Store`` that also makes create-only puts, locked when the bucket has
    Object Lock (``put_locked``)."""

    def __init__(self, cfg: S3Config, client: Any, stack: AsyncExitStack) -> None:
        super().__init__(cfg, client, stack)
        self.locked: bool | None = None

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

    async def put_locked(self, key: str, data: bytes, *, retain_seconds: float) -> bool:
        """Publish ``data`` at ``key`` once; return whether it is under Object Lock.

        Raises ``AlreadyExists`` if the key exists, else the store's errors.
        """
        extra: dict[str, Any] = {"IfNoneMatch": "*", "ContentType": "application/json"}
        locked = await self.lock_enabled()
        if locked:
            until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=retain_seconds)
            extra |= {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until}
        await self._call(key, "put_object", Key=self._key(key), Body=data, **extra)
        return locked
