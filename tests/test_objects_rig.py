"""Shared rig of the objects tests (no tests here): region a's ``data`` bucket →
region b's vault → region b's ``data`` bucket (the mirror), each test under its
own prefix, shipper and sink running in-process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from agent.config import AgentConfig, StreamConfig
from agent.lab import Lab
from agent.lab.stream_rig import running_pair
from replicators.bucket import Bucket
from replicators.errors import NotFound
from replicators.keys import build_key_provider
from replicators.metrics import Metrics
from replicators.objects.mirror import MirrorTarget
from replicators.objects.options import ObjectsOptions
from replicators.objects.source import ObjectsSource
from replicators.s3 import S3Store
from replicators.shipper import Shipper
from replicators.sink import Sink


def s3(lab: Lab, region: str, prefix: str) -> dict[str, Any]:
    creds = lab.s3_credentials
    return {
        "endpoint": lab.s3_endpoint(region),
        "bucket": "data",
        "prefix": prefix,
        "addressing_style": "path",
        "access_key": f"file:{creds.access_key_file}",
        "secret_key": f"file:{creds.secret_key_file}",
    }


def filer_address(lab: Lab, region: str) -> str:
    return f"127.0.0.1:{lab.port(region, 'filer')}.{lab.port(region, 'filer_grpc')}"


def options(lab: Lab, prefix: str, **extra: Any) -> ObjectsOptions:
    table = {"source": s3(lab, "a", prefix), "mirror": s3(lab, "b", prefix)}
    table.setdefault("inline_max", "1MiB")
    return ObjectsOptions.model_validate(table | extra)


def stream_config(name: str, opts: ObjectsOptions) -> StreamConfig:
    return StreamConfig(name=name, kind="objects", objects=opts, segment_max_bytes=8 << 20)


@dataclass
class Rig:
    name: str
    opts: ObjectsOptions
    cfg_a: AgentConfig
    cfg_b: AgentConfig
    workdir: Path
    metrics: Metrics = field(default_factory=lambda: Metrics(CollectorRegistry()))

    async def source_bucket(self) -> Bucket:
        return await Bucket.open(self.opts.source)

    async def mirror_bucket(self) -> Bucket:
        return await Bucket.open(self.opts.mirror)

    @contextlib.asynccontextmanager
    async def running(self, max_age: float = 0.1) -> AsyncIterator[tuple[Shipper, Sink]]:
        """Shipper and sink looping until the block ends."""
        async with contextlib.AsyncExitStack() as stack:
            peer = self.cfg_a.peers[0]
            store = await S3Store.open(peer.vault)
            stack.push_async_callback(store.aclose)
            send = build_key_provider(peer.keys)
            recv = build_key_provider(self.cfg_b.keys)
            stack.push_async_callback(send.aclose)
            stack.push_async_callback(recv.aclose)
            source = ObjectsSource(self.opts, await self.source_bucket(), self.workdir / "src")
            stack.push_async_callback(source.aclose)
            target = MirrorTarget(await self.mirror_bucket(), self.workdir / "dst")
            stack.push_async_callback(target.aclose)
            pair = running_pair(
                self.name,
                "objects",
                source,
                target,
                store,
                (send, recv),
                self.workdir,
                metrics=self.metrics,
                max_age=max_age,
                poll=0.1,
            )
            async with pair as (shipper, sink):
                yield shipper, sink


async def snapshot(bucket: Bucket, deep: bool = True) -> dict[str, tuple[Any, ...]]:
    """key → (size, content type, user metadata without ours, bytes hash) of a bucket."""
    out: dict[str, tuple[Any, ...]] = {}
    sem = asyncio.Semaphore(16)

    async def one(key: str) -> None:
        async with sem:
            try:
                head = await bucket.head(key)
                digest = await bucket.content_hash(key) if deep else ""
            except NotFound:
                return  # deleted since listed
        meta = {k: v for k, v in head.metadata.items() if not k.startswith("dragent-")}
        out[key] = (head.size, head.content_type, meta, digest)

    async for page in bucket.scan():
        async with asyncio.TaskGroup() as tg:
            for obj in page:
                tg.create_task(one(obj.key))
    return dict(sorted(out.items()))


async def same(src: Bucket, dst: Bucket) -> bool:
    """The two buckets hold the same keys, bytes, content types and user metadata."""
    a = await snapshot(src)
    b = await snapshot(dst)
    return a == b and len(a) > 0
