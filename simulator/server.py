"""Serving the app with uvicorn: in a background thread (tests, demo) or in the foreground (CLI)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp

from simulator.app import create_app, gate_of
from simulator.config import SimConfig

# Many clients hold a stream each; the default backlog of 100 drops bursts of connects.
LISTEN_BACKLOG = 4096


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket; binding before serving lets port 0 resolve to a known free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # An explicit IPPROTO_TCP makes asyncio set TCP_NODELAY on accepted connections; with proto 0
    # it does not, and Nagle plus delayed ACKs add ~40 ms to every keep-alive response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def build_server(app: ASGIApp, *, shutdown_timeout_s: int = 1) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ws="none",
        backlog=LISTEN_BACKLOG,
        # A request still sleeping (first-token latency) would otherwise hold shutdown until it ends.
        timeout_graceful_shutdown=shutdown_timeout_s,
    )
    return uvicorn.Server(config)


class SimServer:
    """The simulator on a real socket, served by uvicorn in a daemon thread.

    Example:
        with SimServer(SimConfig(), port=0) as sim:
            httpx.get(f"{sim.base_url}/models", headers={"Authorization": "Bearer sk-test"})
    """

    def __init__(
        self,
        cfg: SimConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        startup_timeout_s: float = 10.0,
    ) -> None:
        self.cfg = cfg or SimConfig()
        self.host = host
        self._requested_port = port
        self._startup_timeout_s = startup_timeout_s
        self._sock: socket.socket | None = None
        self._port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._app: Starlette | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("SimServer is not started")
        return self._port

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> SimServer:
        """Starts serving; returns once the server accepts connections.

        Raises:
            OSError: the address cannot be bound.
            RuntimeError: the server did not come up within ``startup_timeout_s``.
        """
        if self._thread is not None:
            raise RuntimeError("SimServer is already started")
        self._sock = bind_socket(self.host, self._requested_port)
        self._port = int(self._sock.getsockname()[1])
        self._closing.clear()
        self._app = create_app(self.cfg, closing=self._closing)
        self._server = build_server(self._app)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("simulator failed to start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Stops serving: open streams end at their next chunk; returns when the thread is gone."""
        self._closing.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self._server = None
        self._thread = None
        self._sock = None

    def stats(self) -> dict[str, Any]:
        """What ``GET /_sim/stats`` returns; still readable after ``stop()``.

        Raises:
            RuntimeError: the server was never started.
        """
        return gate_of(self._started_app()).stats()

    def reset(self) -> None:
        """What ``POST /_sim/reset`` does: clears stats, quota windows and script counters."""
        gate_of(self._started_app()).reset()

    def _started_app(self) -> Starlette:
        if self._app is None:
            raise RuntimeError("SimServer is not started")
        return self._app

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def serve_in_thread(app: ASGIApp, *, lifespan: bool = False, host: str = "127.0.0.1") -> Iterator[str]:
    """``app`` served by uvicorn in a daemon thread on a free port; yields ``http://host:port``.

    For tests and local tools: the gateway (``lifespan=True`` closes its Redis connections at the
    end), a hand-written upstream, anything ASGI.
    """
    sock = bind_socket(host, 0)
    server = build_server(app)
    if lifespan:
        server.config.lifespan = "on"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
