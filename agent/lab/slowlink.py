"""A link with distance: a TCP relay that holds every chunk for a delay, each way.

The kernel here has no ``netem`` (``tc qdisc ... netem delay`` is refused), so the
lab makes a region-to-region round trip longer in user space: a client connects to
the relay's port instead of the server's, and every chunk read from either side is
written to the other ``delay`` seconds after it arrived, in order (a one-way
propagation delay; a round trip gains twice it). ``rate`` (bytes per second, each
direction, optional) paces what leaves the relay like a link's bandwidth does.
What it does not model: loss, reordering, jitter, and a window that fills (the
relay reads ahead without bound while a chunk waits, as a long fat pipe would).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque


class SlowLink:
    """``await SlowLink(host, port, delay=0.02).start()`` returns the port to connect to."""

    def __init__(self, host: str, port: int, *, delay: float, rate: float | None = None) -> None:
        self.host, self.port = host, port
        self.delay = delay
        self.rate = rate
        self.bytes = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, listen_port: int = 0) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", listen_port)
        return int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def __aenter__(self) -> SlowLink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_r, up_w = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await self._both(reader, writer, up_r, up_w)
        except asyncio.CancelledError:
            pass  # the relay is closing: the handler ends quietly (asyncio logs otherwise)
        finally:
            for w in (writer, up_w):
                w.close()
            self._tasks.discard(task)

    async def _both(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_r: asyncio.StreamReader,
        up_w: asyncio.StreamWriter,
    ) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pipe(reader, up_w))
                tg.create_task(self._pipe(up_r, writer))
        except* (OSError, asyncio.IncompleteReadError):
            pass  # a side hung up

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copy ``src`` to ``dst``, each chunk ``delay`` after it was read; EOF likewise."""
        queue: deque[tuple[float, bytes]] = deque()
        more = asyncio.Event()
        done = False

        async def read() -> None:
            nonlocal done
            while chunk := await src.read(65536):
                queue.append((time.monotonic() + self.delay, chunk))
                more.set()
            done = True
            more.set()

        reading = asyncio.create_task(read())
        try:
            while True:
                while not queue:
                    if done:
                        if dst.can_write_eof():
                            dst.write_eof()
                        return
                    more.clear()
                    await more.wait()
                due, chunk = queue.popleft()
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                dst.write(chunk)
                self.bytes += len(chunk)
                await dst.drain()
                if self.rate:
                    await asyncio.sleep(len(chunk) / self.rate)
        finally:
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading
