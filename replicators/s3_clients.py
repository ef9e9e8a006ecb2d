"""botocore S3 clients shared by the stores of one event loop that would build the same.

A client is built from the endpoint, the region, the keys and the request settings,
never from the bucket or the prefix (``S3Store`` names the bucket in each request).
An agent opens a few stores for each partition it takes, most of them alike (the
source bucket, the vault, the mirror), and building a client costs more CPU than
many requests through it: a member taking 32 partitions spent most of its start-up
building identical clients (``benchmarks/s3_open_cpu.py``). The stores that would
build the same client share one, with its connection pool (``max_pool_connections``:
the config's ``max_concurrency``, now for all of them together: one bounded pool per
endpoint and settings); the last store closed closes it. Clients belong to the event
loop they were built in.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Hashable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

Factory = Callable[[], AbstractAsyncContextManager[Any]]


@dataclass
class _Shared:
    ready: asyncio.Future[Any]
    stack: AsyncExitStack = field(default_factory=AsyncExitStack)
    users: int = 0


_LOOPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, _Shared]] = (
    weakref.WeakKeyDictionary()
)


async def acquire(key: Hashable, make: Factory) -> Any:
    """The loop's client for ``key``, built with ``make`` (an async context manager)
    if there is none; every ``acquire`` is paired with one ``release(key)``."""
    clients = _LOOPS.setdefault(asyncio.get_running_loop(), {})
    shared = clients.get(key)
    if shared is None:
        shared = _Shared(asyncio.get_running_loop().create_future())
        clients[key] = shared
        try:
            shared.ready.set_result(await shared.stack.enter_async_context(make()))
        except BaseException as exc:
            del clients[key]
            if isinstance(exc, asyncio.CancelledError):
                shared.ready.cancel()
            else:
                shared.ready.set_exception(exc)
                shared.ready.exception()  # retrieved: the waiters get it too
            raise
    shared.users += 1
    try:
        return await asyncio.shield(shared.ready)
    except BaseException:
        shared.users -= 1
        raise


async def release(key: Hashable) -> None:
    """One user fewer; the last one closes the client."""
    clients = _LOOPS.get(asyncio.get_running_loop(), {})
    shared = clients.get(key)
    if shared is None:
        return
    shared.users -= 1
    if shared.users <= 0:
        del clients[key]
        await shared.stack.aclose()


def open_clients() -> int:
    """Clients open in this loop (for tests)."""
    return len(_LOOPS.get(asyncio.get_running_loop(), {}))
