"""The HTTP layer: Starlette routes, auth, request ids and JSON/SSE responses.

Only I/O lives here; every decision is in validate/generate/finish/render.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from simulator.answer import answer, chunk_sizes
from simulator.cache import PrefixCache
from simulator.catalog import CATALOG
from simulator.config import SimConfig
from simulator.errors import JSON_CONTENT_TYPE, ApiError, bad_api_key, invalid_request, missing_auth
from simulator.stream import SSE_CONTENT_TYPE, Delivery, paced, sse_frames
from simulator.validate import parse_chat_request, parse_estimate_request

Endpoint = Callable[[Request], Awaitable[Response]]


def create_app(cfg: SimConfig | None = None, *, closing: threading.Event | None = None) -> Starlette:
    """Builds the simulator's ASGI app; each app has its own context cache.

    Args:
        cfg: the simulator's knobs; defaults to ``SimConfig()``.
        closing: once set, open streams end at their next chunk so the server can shut down promptly.
    """
    sim = _Simulator(cfg or SimConfig(), closing or threading.Event())
    routes = [
        Route("/v1/chat/completions", _api(sim.chat), methods=["POST"]),
        Route("/v1/models", _api(sim.models), methods=["GET"]),
        Route("/v1/tokenizers/estimate-token-count", _api(sim.estimate), methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(RequestIdMiddleware)],
        exception_handlers={HTTPException: _http_error},
    )


class _Simulator:
    def __init__(self, cfg: SimConfig, closing: threading.Event) -> None:
        self.cfg = cfg
        self.closing = closing
        self.cache = PrefixCache(cfg.cache_entries)

    def delivery(self, request: Request) -> Delivery:
        # One place to choose per-request pacing; scripted faults will be selected here.
        return Delivery(self.cfg.first_token_latency_s, self.cfg.chunk_interval_s)

    async def chat(self, request: Request) -> Response:
        req = parse_chat_request(await _json_body(request))
        result = answer(self.cfg, self.cache, req)
        frames = sse_frames(result.chunks(chunk_sizes(self.cfg, req)))
        delivery = self.delivery(request)
        if req.stream:
            headers = {"content-type": SSE_CONTENT_TYPE, "cache-control": "no-cache"}
            return StreamingResponse(paced(frames, delivery, self.closing.is_set), headers=headers)
        await asyncio.sleep(delivery.duration_s(len(frames)))
        return json_response(result.body())

    async def models(self, request: Request) -> Response:
        return json_response({"data": [_model_entry(spec.id, spec.created) for spec in CATALOG.values()]})

    async def estimate(self, request: Request) -> Response:
        total = parse_estimate_request(await _json_body(request))
        return json_response({"data": {"total_tokens": total}})


def _api(endpoint: Endpoint) -> Endpoint:
    async def wrapped(request: Request) -> Response:
        try:
            _authorize(request)
            return await endpoint(request)
        except ApiError as err:
            return error_response(err)

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
    # Field for field the only captured /v1/models reply (MOONSHOT_API.md §1, X1), empty root/parent included.
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


def json_response(payload: Any, status: int = 200) -> Response:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, status_code=status, headers={"content-type": JSON_CONTENT_TYPE})


def error_response(err: ApiError) -> Response:
    return Response(err.body(), status_code=err.status, headers={"content-type": JSON_CONTENT_TYPE})


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
