"""The HTTP layer: Starlette routes, auth, request ids and JSON/SSE responses.

Only I/O lives here; every decision is in validate/generate/finish/render, and in gate/faults for
quotas and injected faults.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from simulator.answer import Answer, answer, chunk_sizes
from simulator.cache import PrefixCache
from simulator.catalog import CATALOG
from simulator.config import SimConfig
from simulator.errors import JSON_CONTENT_TYPE, ApiError, bad_api_key, invalid_request, missing_auth
from simulator.faults import HUGE_ERROR_BLOCK_INTERVAL_S, HUGE_ERROR_STATUS, Plan, huge_error_blocks, plan
from simulator.gate import Gate, Ticket
from simulator.scripts import parse_sim
from simulator.stream import (
    SSE_CONTENT_TYPE,
    Delivery,
    cut_short,
    hide_cut_tracebacks,
    paced,
    pause_s,
    stamped,
    trickle,
)
from simulator.validate import parse_chat_request, parse_estimate_request

Endpoint = Callable[[Request], Awaitable[Response]]


def create_app(cfg: SimConfig | None = None, *, closing: threading.Event | None = None) -> Starlette:
    """Builds the simulator's ASGI app; each app has its own context cache, quotas and stats.

    Args:
        cfg: the simulator's knobs; defaults to ``SimConfig()``.
        closing: once set, open streams end at their next chunk so the server can shut down promptly.
    """
    sim = _Simulator(cfg or SimConfig(), closing or threading.Event())
    hide_cut_tracebacks()
    routes = [
        Route("/v1/chat/completions", _api(sim.chat, on_status=sim.gate.count), methods=["POST"]),
        Route("/v1/models", _api(sim.models), methods=["GET"]),
        Route("/v1/tokenizers/estimate-token-count", _api(sim.estimate), methods=["POST"]),
        # Test hooks, outside /v1 and without auth: the real API has nothing here.
        Route("/_sim/stats", sim.stats, methods=["GET"]),
        Route("/_sim/reset", sim.reset, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(RequestIdMiddleware)],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.gate = sim.gate
    return app


def gate_of(app: Starlette) -> Gate:
    """The admission gate (quotas, faults, stats) of an app built by ``create_app``."""
    gate = app.state.gate
    assert isinstance(gate, Gate)
    return gate


class _Simulator:
    def __init__(self, cfg: SimConfig, closing: threading.Event) -> None:
        self.cfg = cfg
        self.closing = closing
        self.cache = PrefixCache(cfg.cache_entries)
        self.gate = Gate(cfg)
        self.pacing = Delivery(cfg.first_token_latency_s, cfg.chunk_interval_s)

    async def chat(self, request: Request) -> Response:
        body = await _json_body(request)
        req = parse_chat_request(body)
        directive = parse_sim(body)
        ticket = self.gate.admit(req, directive)
        if ticket.fault is not None and ticket.fault.name == "huge_error":
            return self._huge_error(ticket)
        try:
            result = answer(self.cfg, self.cache, req)
            wire = plan(ticket.fault, result.chunks(chunk_sizes(self.cfg, req)), self.pacing)
        except BaseException:
            self.gate.settle(ticket, 500, 0, 0)
            raise
        usage = result.usage()

        def settle() -> None:
            # Charged in full even if the stream was cut: the tokens were generated all the same.
            self.gate.settle(ticket, 200, usage["completion_tokens"], usage["total_tokens"])

        if req.stream:
            headers = {"content-type": SSE_CONTENT_TYPE, "cache-control": "no-cache"}
            frames = paced(wire.frames, wire.delivery, self.closing.is_set)
            return _Tracked(stamped(frames) if directive and directive.stamp else frames, settle, headers)
        return await self._reply(result, wire, settle)

    def _huge_error(self, ticket: Ticket) -> Response:
        # Admitted like the 5xx faults (it reached the service and failed), charged nothing; the page
        # is over when sent, or when the client hangs up having read what it wanted.
        assert ticket.fault is not None
        blocks = trickle(huge_error_blocks(ticket.fault), HUGE_ERROR_BLOCK_INTERVAL_S, self.closing.is_set)

        def settle() -> None:
            self.gate.settle(ticket, HUGE_ERROR_STATUS, 0, 0)

        return _Tracked(blocks, settle, {"content-type": "text/plain"}, status_code=HUGE_ERROR_STATUS)

    async def _reply(self, result: Answer, wire: Plan, settle: Callable[[], None]) -> Response:
        # A non-stream answer waits as long as its stream would take, then comes in one piece.
        try:
            await pause_s(wire.delivery.duration_s(len(wire.frames)), self.closing.is_set)
        except BaseException:
            settle()
            raise
        body = _compact(result.body())
        if wire.delivery.cut_after is not None:
            headers = {"content-type": JSON_CONTENT_TYPE, "content-length": str(len(body))}
            return _Tracked(cut_short(body), settle, headers)
        settle()
        return Response(body, headers={"content-type": JSON_CONTENT_TYPE})

    async def models(self, request: Request) -> Response:
        return json_response({"data": [_model_entry(spec.id, spec.created) for spec in CATALOG.values()]})

    async def estimate(self, request: Request) -> Response:
        total = parse_estimate_request(await _json_body(request))
        return json_response({"data": {"total_tokens": total}})

    async def stats(self, request: Request) -> Response:
        return json_response(self.gate.stats())

    async def reset(self, request: Request) -> Response:
        self.gate.reset()
        return json_response({"reset": True})


class _Tracked(StreamingResponse):
    """A streamed body that reports when it is over, however it ends (done, cut, client gone).

    A ``finally`` in the body iterator is not enough: if the client leaves before the first
    chunk, the iterator never starts and its ``finally`` never runs.
    """

    def __init__(
        self,
        content: AsyncIterable[bytes],
        on_close: Callable[[], None],
        headers: Mapping[str, str],
        status_code: int = 200,
    ) -> None:
        super().__init__(content, status_code=status_code, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _api(endpoint: Endpoint, on_status: Callable[[int], None] | None = None) -> Endpoint:
    async def wrapped(request: Request) -> Response:
        try:
            _authorize(request)
            response = await endpoint(request)
        except ApiError as err:
            response = error_response(err)
        if on_status is not None:
            on_status(response.status_code)
        return response

    return wrapped


def _authorize(request: Request) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise missing_auth()
    if not token.startswith("sk-"):
        raise bad_api_key()


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise invalid_request("the request body must be a JSON object") from err


def _model_entry(model: str, created: int) -> dict[str, Any]:
    # Field for field the only captured /v1/models reply (docs/moonshot-api.md §1, X1), empty root/parent included.
    permission = {
        "created": 0,
        "id": "",
        "object": "",
        "allow_create_engine": False,
        "allow_sampling": False,
        "allow_logprobs": False,
        "allow_search_indices": False,
        "allow_view": False,
        "allow_fine_tuning": False,
        "organization": "public",
        "group": "public",
        "is_blocking": False,
    }
    return {
        "created": created,
        "id": model,
        "object": "model",
        "owned_by": "moonshot",
        "permission": [permission],
        "root": "",
        "parent": "",
    }


def _compact(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(_compact(payload), status_code=status, headers={"content-type": JSON_CONTENT_TYPE})


def error_response(err: ApiError) -> Response:
    # No Retry-After, ever: the real API sends none, the delay is only in the message (§7).
    return Response(err.body(), status_code=err.status, headers={"content-type": err.content_type})


async def _http_error(request: Request, exc: Exception) -> Response:
    # Unknown paths and methods get the gateway's own body, as captured for a GET on
    # /v1/chat/completions (X1); it is not the {"error": {...}} shape of the API proper.
    payload = {
        "code": 5,
        "error": "url.not_found",
        "message": "没找到对象",
        "method": request.method,
        "scode": "0x5",
        "status": False,
        "ua": request.headers.get("user-agent", ""),
        "url": request.url.path,
    }
    return json_response(payload, status=404)


class RequestIdMiddleware:
    """Adds ``Msh-Request-Id`` to every response, streams and errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"msh-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
