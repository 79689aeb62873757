"""A real webhook receiver for the tests: Starlette served by uvicorn on a free port, in a thread.

Every POST to ``/<name>`` is recorded (headers, body, time); what it answers is scripted per name
(``script("a", 500, 500)`` answers two 500s, then 200s): a status, ``"redirect"`` (307 to
``/<name>-moved``), or ``"hold"`` (the request is recorded, then held until ``release()`` or
``hold_s``, then answered 200: a node can be killed, or its link cut, mid-delivery).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from simulator.server import serve_in_thread


@dataclass
class Received:
    name: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.time)


class Receiver:
    def __init__(self, *, hold_s: float = 10.0) -> None:
        self.hold_s = hold_s
        self.requests: list[Received] = []
        self.scripts: dict[str, list[int | str]] = {}
        self._changed = threading.Condition()
        self._released = threading.Event()
        self.url = ""

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{name}", self._handle, methods=["POST", "GET"])])

    async def _handle(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await request.body()
        with self._changed:
            self.requests.append(Received(name, dict(request.headers), body))
            script = self.scripts.get(name) or []
            action = script.pop(0) if script else 200
            self._changed.notify_all()
        if action == "hold":
            deadline = time.monotonic() + self.hold_s
            while not self._released.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return Response(status_code=200)
        if action == "redirect":
            return Response(status_code=307, headers={"location": f"{self.url}/{name}-moved"})
        return Response(b"answer from the receiver", status_code=int(action))

    def script(self, name: str, *actions: int | str) -> str:
        """Set what ``/<name>`` answers next; returns its URL under ``localhost``."""
        self.scripts[name] = list(actions)
        return f"{self.url.replace('127.0.0.1', 'localhost')}/{name}"

    def received(self, name: str) -> list[Received]:
        with self._changed:
            return [r for r in self.requests if r.name == name]

    def wait_for(self, name: str, count: int, timeout_s: float = 20.0) -> list[Received]:
        """The first ``count`` requests to ``/<name>``, waiting for them; AssertionError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                got = [r for r in self.requests if r.name == name]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"/{name}: {len(got)} request(s) after {timeout_s}s, expected {count}")
                self._changed.wait(left)

    def release(self) -> None:
        self._released.set()


@contextmanager
def serve_receiver(**options: float) -> Iterator[Receiver]:
    receiver = Receiver(**options)
    with serve_in_thread(receiver.app()) as url:
        receiver.url = url
        yield receiver
        receiver.release()
