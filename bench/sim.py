"""The simulator for the benchmarks, plus a record of every chat request's arrival and status.

``SimServer`` keeps books only on admitted requests: a quota 429 leaves no trace but a counter.
To show how hard a system pushes against a limit, the benchmark also needs *when* each refused
request arrived, so this serves the same app (``simulator.create_app``) behind a thin ASGI
wrapper that notes (arrival time, status) of every ``POST /v1/chat/completions``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from simulator import SimConfig, create_app
from simulator.app import gate_of
from simulator.server import bind_socket, build_server

CHAT_PATH = "/v1/chat/completions"


class ArrivalRecorder:
    """ASGI middleware: notes (arrival ``time.monotonic()``, status) of every chat request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.arrivals: list[tuple[float, int]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()

        async def noting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.arrivals.append((arrived, int(message["status"])))
            await send(message)

        await self.app(scope, receive, noting)


class RecordingSim:
    """The simulator on 127.0.0.1 (uvicorn in a daemon thread), recording arrivals.

    Times: ``arrivals`` are ``time.monotonic()``; ``stats()`` records are seconds since the
    simulator's own start. ``reset()`` re-measures the offset between the two, so
    ``to_monotonic`` turns a stats time into a monotonic one.
    """

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self._closing = threading.Event()
        self._app = create_app(cfg, closing=self._closing)
        self._gate = gate_of(self._app)
        self._sock = bind_socket("127.0.0.1", 0)
        self.port = int(self._sock.getsockname()[1])
        self._recorder = ArrivalRecorder(self._app)
        self._server = build_server(self._recorder)
        self._thread: threading.Thread | None = None
        self._offset = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def arrivals(self) -> list[tuple[float, int]]:
        return self._recorder.arrivals

    def start(self) -> RecordingSim:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the simulator did not start")
            time.sleep(0.005)
        self.reset()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sock.close()

    def reset(self) -> None:
        """Empty stats, quota windows and the arrival record; the next request starts a fresh minute."""
        self._gate.reset()
        self.arrivals.clear()
        before = time.monotonic()
        uptime = float(self._gate.stats()["uptime_s"])  # nothing admitted: a cheap snapshot
        self._offset = (before + time.monotonic()) / 2 - uptime

    def stats(self) -> dict[str, Any]:
        return self._gate.stats()

    def to_monotonic(self, sim_time_s: float) -> float:
        return sim_time_s + self._offset

    def __enter__(self) -> RecordingSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
