"""The simulator behind a tap that records every upstream call and the job it belongs to.

The simulator's own books (``SimServer.stats()``) keep one record per admitted request but not
what the request said. Each nemesis job carries a unique marker in its user message
(``[nm:<tag>]``); the tap, an ASGI wrapper around the simulator's app, reads it from the body of
every chat call and records the call's start (arrival), end and status on the test process's
wall clock, the clock the producers' cancel log uses too.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from simulator import SimConfig, create_app
from simulator.app import gate_of
from simulator.server import serve_in_thread

MARKER = re.compile(r"\[nm:([A-Za-z0-9_.-]+)\]")
CHAT_PATH = "/v1/chat/completions"


def marker(tag: str) -> str:
    """The text a job's user message carries so its upstream calls can be told apart."""
    return f"[nm:{tag}]"


@dataclass
class UpstreamCall:
    """One chat call as the upstream saw it; times are unix seconds (``time.time()``)."""

    tag: str | None
    start: float
    end: float | None = None
    status: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {"tag": self.tag, "start": self.start, "end": self.end, "status": self.status}


def tag_of(body: bytes) -> str | None:
    """The marker's tag in a chat body's messages, or None."""
    try:
        request = json.loads(body)
        messages = request.get("messages") or []
        text = " ".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
    except (ValueError, AttributeError):
        return None
    found = MARKER.search(text)
    return found.group(1) if found else None


class UpstreamTap:
    """ASGI middleware: records each chat call (``calls``) and passes it on unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.calls: list[UpstreamCall] = []
        self._lock = threading.Lock()

    def snapshot(self) -> list[UpstreamCall]:
        with self._lock:
            return list(self.calls)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        start = time.time()
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        call = UpstreamCall(tag_of(body), start)
        with self._lock:
            self.calls.append(call)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                call.status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, replay, watch)
        finally:
            call.end = time.time()


@dataclass
class TappedSimulator:
    """A running simulator with its tap: ``base_url`` for the nodes, ``tap.calls``, ``stats()``."""

    base_url: str
    tap: UpstreamTap
    app: Any

    def stats(self) -> dict[str, Any]:
        """The simulator's own books (``GET /_sim/stats``)."""
        return gate_of(self.app).stats()


@contextlib.contextmanager
def tapped_simulator(cfg: SimConfig) -> Iterator[TappedSimulator]:
    """The simulator under ``cfg`` served on a free port behind an ``UpstreamTap``."""
    closing = threading.Event()
    app = create_app(cfg, closing=closing)
    tap = UpstreamTap(app)
    try:
        with serve_in_thread(tap) as url:
            yield TappedSimulator(f"{url}/v1", tap, app)
            closing.set()  # open streams end at their next chunk, so the server stops promptly
    finally:
        closing.set()
