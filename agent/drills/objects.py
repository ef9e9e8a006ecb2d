"""The restore drill of an ``objects`` stream: point-in-time restore into a scratch bucket.

1. ``restore`` (``replicators/objects/restore.py``): the stream's whole
   segment log is read (every segment verified) and the state of every key at
   the drill's time is written into a new bucket ``dragent-drill-<id>`` in the
   mirror's object store (the passive region).
2. ``verify`` (``verifiers/objects.py``): Merkle key trees of the scratch
   bucket and of the mirror (the ready-to-serve copy), both from the objects'
   bytes (every object read and hashed), compared; differing keys are
   listed. The mirror keeps applying while the drill runs: an object changed
   meanwhile shows as a difference.
3. teardown: every object of the scratch bucket and the bucket are deleted.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from botocore.exceptions import ClientError

from agent.config import StreamConfig
from replicators.errors import DragentError
from replicators.keys import KeyProvider
from replicators.s3 import s3_client
from replicators.store import ObjectStore
from replicators.vault import Vault


def scratch_bucket(drill_id: str, stream: str) -> str:
    """A valid, unique bucket name for one stream of one drill."""
    name = f"dragent-drill-{drill_id}-{stream}".lower().replace("_", "-")
    return name[:63].rstrip("-")


async def restore_and_compare(
    stream: StreamConfig,
    store: ObjectStore,
    keys: KeyProvider,
    *,
    drill_id: str,
    at: float | None,
    result: Any,
) -> None:
    """Fill ``result`` (a ``StreamResult``). Never leaves the scratch bucket behind."""
    from replicators.bucket import Bucket
    from replicators.objects.restore import restore
    from verifiers.objects import compare, source_tree

    opts = stream.objects
    assert opts is not None
    result.method = "objects-pitr"
    name = scratch_bucket(drill_id, stream.name)
    scratch_cfg = opts.mirror.model_copy(update={"bucket": name, "prefix": opts.source.prefix})
    to_ns = int((time.time() if at is None else at) * 1e9)
    phase, t = "restore", time.monotonic()
    async with s3_client(opts.mirror) as admin:
        try:
            await admin.create_bucket(Bucket=name)
            into = await Bucket.open(scratch_cfg)
            mirror = await Bucket.open(opts.mirror)
            try:
                out = await restore(Vault(store), keys, stream.name, "", to_ns, into, False)
                result.segments, result.records, result.bytes = (
                    out.segments_read, out.objects, out.bytes,
                )  # fmt: skip
                result.seconds["restore"] = round(time.monotonic() - t, 6)
                phase, t = "verify", time.monotonic()
                (restored, _, _), (served, _, _) = (
                    await source_tree(into, None), await source_tree(mirror, None),
                )  # fmt: skip
                found = compare(restored, served)
                result.seconds["verify"] = round(time.monotonic() - t, 6)
            finally:
                await into.aclose()
                await mirror.aclose()
            result.roots = {"restored": restored.root().hex(), "mirror": served.root().hex()}
            result.equal = not found.keys
            if found.keys:
                result.problem = f"{len(found.keys)} keys differ: " + ", ".join(found.keys[:5])
        except (DragentError, ClientError) as exc:
            result.seconds.setdefault(phase, round(time.monotonic() - t, 6))
            result.problem = f"{phase}: {exc}"
        finally:
            t = time.monotonic()
            await _drop_bucket(admin, name)
            result.seconds["teardown"] = round(time.monotonic() - t, 6)


async def _drop_bucket(admin: Any, name: str) -> None:
    """Delete every object of ``name`` and the bucket; a missing bucket is fine."""
    with contextlib.suppress(Exception):
        token: dict[str, str] = {}
        while True:
            page = await admin.list_objects_v2(Bucket=name, **token)
            items = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if items:
                await admin.delete_objects(Bucket=name, Delete={"Objects": items, "Quiet": True})
            if not page.get("IsTruncated"):
                break
            token = {"ContinuationToken": page["NextContinuationToken"]}
        await admin.delete_bucket(Bucket=name)
