"""A loopback TCP proxy the test controls: the network between the agent and its broker.

    agent ──▶ 127.0.0.1:proxy.port ──▶ upstream (the broker)

Modes, switched at any time from the test's thread:

* ``pass``: bytes flow both ways, optionally each chunk held back ``delay`` seconds
  (a slow link; order is kept);
* ``blackhole``: connections stay open but every byte is silently dropped, and new
  connections are accepted into the same void — a cut cable or a hung broker, noticed
  by the client only through its MQTT keepalive (about 2 × keepalive);
* ``refuse``: the listening socket is closed, so connects get ECONNREFUSED (the
  broker host is up but nothing listens), and live connections are reset.

:meth:`TcpProxy.reset` aborts every live connection with a TCP RST (noticed at once)
and keeps the current mode for new ones.

The proxy runs an asyncio loop on its own daemon thread; every control method is
thread-safe and returns once the change is in effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

Mode = Literal["pass", "blackhole", "refuse"]
T = TypeVar("T")

_CHUNK = 65536


class _Link:
    """One client connection and its upstream twin."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter):
        self.client = client
        self.upstream = upstream
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER with a zero timeout turns close() into an RST.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream_host:upstream_port`` under test control."""

    def __init__(self, upstream_host: str, upstream_port: int, port: int = 0):
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = port
        self.mode: Mode = "pass"
        self.delay = 0.0
        self.connections_total = 0
        self.bytes_forwarded = 0
        self.bytes_dropped = 0
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tcp-proxy", daemon=True
        )

    # ------------------------------------------------------------ control

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_pass(self, delay: float = 0.0) -> None:
        """Forward everything, each chunk ``delay`` seconds late. Listens again after ``refuse``."""
        self._call(self._set_mode("pass", delay))

    def blackhole(self) -> None:
        """Keep connections open but drop every byte from now on."""
        self._call(self._set_mode("blackhole", 0.0))

    def refuse(self) -> None:
        """Stop listening (connects are refused) and reset live connections."""
        self._call(self._set_mode("refuse", 0.0))

    def reset(self) -> int:
        """Abort every live connection with an RST; returns how many there were."""
        return self._call(self._reset_all())

    @property
    def live_connections(self) -> int:
        return len(self._links)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -------------------------------------------------------- loop thread

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _set_mode(self, mode: Mode, delay: float) -> None:
        self.mode = mode
        self.delay = delay
        if mode == "refuse":
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
            await self._reset_all()
        elif self._server is None:
            await self._listen()

    async def _reset_all(self) -> int:
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.clear()
        return len(links)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self._reset_all()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        if self.mode == "blackhole":
            # Accepted, then nothing: read and discard until the client gives up.
            link = _Link(writer, writer)
            self._links.add(link)
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await reader.read(_CHUNK):
                    self.bytes_dropped += len(data)
            self._links.discard(link)
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()  # upstream down: the client sees the connection die
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            *self._direction(reader, up_writer, link),
            *self._direction(up_reader, writer, link),
        ]
        await asyncio.gather(*link.tasks, return_exceptions=True)
        self._links.discard(link)
        for w in (writer, up_writer):
            w.transport.abort()

    def _direction(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> list[asyncio.Task[None]]:
        """One direction: a receiver stamping each chunk with when it may leave, and a
        sender that waits for that moment. Latency without a throughput cap, order kept."""
        line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        return [
            asyncio.create_task(self._receive(reader, line, link)),
            asyncio.create_task(self._send(line, writer, link)),
        ]

    async def _receive(
        self,
        reader: asyncio.StreamReader,
        line: asyncio.Queue[tuple[float, bytes] | None],
        link: _Link,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(_CHUNK):
                if self.mode == "blackhole":
                    self.bytes_dropped += len(data)
                else:
                    line.put_nowait((loop.time() + self.delay, data))
        except OSError:
            pass
        line.put_nowait(None)

    async def _send(
        self,
        line: asyncio.Queue[tuple[float, bytes] | None],
        writer: asyncio.StreamWriter,
        link: _Link,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await line.get()) is not None:
                due, data = item
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if self.mode == "blackhole":  # the cable was cut while this was on the wire
                    self.bytes_dropped += len(data)
                    continue
                writer.write(data)
                await writer.drain()
                self.bytes_forwarded += len(data)
        except OSError:
            pass
        finally:
            # Either side closing ends the whole link, as TCP through a real proxy would.
            for task in link.tasks:
                if task is not asyncio.current_task():
                    task.cancel()
