"""A TCP proxy the tests control: one local port forwarded to a target, with faults on demand.

Point one process (a worker node, say) at the proxy instead of at Redis or RabbitMQ, and the
faults below hit that process's links only, while every other client keeps its own:

- ``cut()`` closes every live connection, both sides at once (RST by default, FIN if asked);
- ``blackhole(seconds)`` stops forwarding bytes both ways without closing anything: connections
  hang, as across a network partition, and what was held back flows once it heals (TCP would
  retransmit it);
- ``refuse(seconds)`` resets every new connection at once, as a host whose port is closed.

One asyncio loop in a daemon thread carries every connection; the control methods are safe to
call from any thread and return at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Bytes read from one side before waiting for the other side to take them (back-pressure beyond this
# is the kernel's socket buffers).
CHUNK_BYTES = 65_536


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's transport and the target's."""

    client: asyncio.StreamWriter
    target: asyncio.StreamWriter | None = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


def _abort(writer: asyncio.StreamWriter, *, reset: bool) -> None:
    """Close at once: with SO_LINGER 0 the kernel sends RST instead of FIN and drops unsent bytes."""
    sock = writer.get_extra_info("socket")
    if reset and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if reset:
        writer.transport.abort()
    else:
        writer.close()


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port``.

    Args:
        target_port: where connections go.
        target_host: the target's address (loopback by default).
        port: the local port to listen on; 0 (default) picks a free one, read back from ``port``.
    """

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"proxy->{target_port}", daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing: asyncio.Event | None = None
        self._heal_at = 0.0  # monotonic time a blackhole ends
        self._refuse_until = 0.0  # monotonic time new connections are accepted again
        self.accepted = 0
        self.refused = 0
        self.cuts = 0

    @property
    def url_host(self) -> str:
        """``host:port`` to put in a URL in place of the target's."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=10)
        return self

    async def _open(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Stop listening and reset every connection; returns once the loop has stopped."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(TimeoutError):
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._cut(reset=True)
        if self._server is not None:
            await self._server.wait_closed()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults -------------------------------------------------------------------------------

    def cut(self, *, reset: bool = True) -> int:
        """Close every live connection now (RST, or FIN with ``reset=False``); returns how many.

        New connections are accepted as usual straight after (see ``refuse`` to keep them out).
        """
        return int(asyncio.run_coroutine_threadsafe(self._cut_async(reset), self._loop).result(timeout=10))

    async def _cut_async(self, reset: bool) -> int:
        return self._cut(reset=reset)

    def _cut(self, *, reset: bool) -> int:
        links = list(self._links)
        for link in links:
            self._drop(link, reset=reset)
        self.cuts += len(links)
        return len(links)

    def blackhole(self, seconds: float) -> None:
        """Stop forwarding bytes both ways for ``seconds`` (from now); nothing is closed or lost.

        A second call extends the blackhole to whichever end is later.
        """
        self._call(self._blackhole, seconds)

    def _call(self, fn: Callable[[float], None], seconds: float) -> None:
        """Run ``fn(seconds)`` on the loop and wait for it: the fault is in force when the caller goes on."""

        async def run() -> None:
            fn(seconds)

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    def _blackhole(self, seconds: float) -> None:
        assert self._flowing is not None
        self._heal_at = max(self._heal_at, time.monotonic() + seconds)
        self._flowing.clear()
        self._loop.call_later(seconds, self._maybe_heal)

    def _maybe_heal(self) -> None:
        if time.monotonic() >= self._heal_at - 0.001 and self._flowing is not None:
            self._flowing.set()

    def refuse(self, seconds: float) -> None:
        """Reset every new connection for ``seconds`` (from now); live ones are left alone."""
        self._call(self._refuse, seconds)

    def _refuse(self, seconds: float) -> None:
        self._refuse_until = max(self._refuse_until, time.monotonic() + seconds)

    def heal(self) -> None:
        """End any blackhole and refusal now."""
        self._call(self._heal, 0.0)

    def _heal(self, _: float) -> None:
        self._heal_at = 0.0
        self._refuse_until = 0.0
        if self._flowing is not None:
            self._flowing.set()

    @property
    def connections(self) -> int:
        """Connections being forwarded now."""
        return len(self._links)

    # --- forwarding ---------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._refuse_until:
            self.refused += 1
            _abort(writer, reset=True)
            return
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            target_reader, target_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            # The target is down (a restart): the client sees its connection reset, as it would directly.
            self._drop(link, reset=True)
            return
        if link not in self._links:  # cut while connecting
            _abort(target_writer, reset=True)
            return
        link.target = target_writer
        link.pumps = [
            asyncio.create_task(self._pump(reader, target_writer, link)),
            asyncio.create_task(self._pump(target_reader, writer, link)),
        ]

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: _Link) -> None:
        assert self._flowing is not None
        try:
            while True:
                data = await source.read(CHUNK_BYTES)
                if not data:
                    break
                # Held, not dropped, while black-holed: a partition delays bytes, TCP does not lose them.
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            return
        # One side ended (or failed): end the other with a FIN, as a transparent proxy would.
        self._drop(link, reset=False)

    def _drop(self, link: _Link, *, reset: bool) -> None:
        if link not in self._links:
            return
        self._links.discard(link)
        current = asyncio.current_task()
        for pump in link.pumps:
            if pump is not current:
                pump.cancel()
        _abort(link.client, reset=reset)
        if link.target is not None:
            _abort(link.target, reset=reset)
