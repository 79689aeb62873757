"""The HTTP gateway: the chat-completions API and a jobs API, served through the queue.

``POST /v1/chat/completions`` takes the API's own request and answers in its own shapes
(stream or not), so the official OpenAI SDK pointed at the gateway works unchanged while the
fleet's limits and retries apply. ``/v1/jobs`` is the asynchronous side: submit, read, follow
as SSE (``id:`` = seq, ``Last-Event-ID`` resumes), cancel. Every route but ``/healthz`` and
``/openapi.json`` needs ``Authorization: Bearer <token>`` with a token from
``MOONQ_GATEWAY_TOKENS``; errors use Moonshot's error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.console import console_routes
from gateway.openapi import openapi_document
from gateway.stream import ChunkStream, error_body, sse
from moonq import budgets
from moonq.cancel import cancel_and_wait
from moonq.errors import (
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobNotFound,
    TenantBudgetExceeded,
    TenantModelNotAllowed,
)
from moonq.models import check_builtin_tools
from moonq.record import STATE_FIELDS, JobField, JobRecord, JobStatus
from moonq.request import ChatRequest, validate_request
from moonq.settings import ClientSettings
from moonq.tenants import SETTING as TENANTS_SETTING
from moonq.tenants import Principal, Tenants
from moonq.webhooks import check_webhook_events, check_webhook_url
from moonq.wire import DEFAULT_PRIORITY, check_priority
from producers.aio import AsyncClient, AsyncJob

OPEN_PATHS = frozenset({"/healthz", "/openapi.json"})
BUILTIN_TOOLS_HEADER = "X-Moonq-Builtin-Tools"
# An operator token (tenants file) submits for the tenant this header names.
TENANT_HEADER = "X-Moonq-Tenant"
# The web console signs in with a gateway token once, then goes by its session cookie (gateway/console/).
CONSOLE_PATH = "/console"


class GatewaySettings(ClientSettings):
    """The gateway's settings (``MOONQ_GATEWAY_*``)."""

    gateway_tokens: str = ""  # comma-separated bearer tokens
    # Moonshot accepts bodies up to 100 MB (base64 images and videos); so do we, by default.
    gateway_max_body_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    # A caller who hangs up on a chat completion: cancel its job (saves tokens) or keep it running.
    gateway_on_disconnect: Literal["cancel", "keep"] = "cancel"
    # MOONQ_PRICES_FILE, as the nodes read it: the console prices each job as the nodes do.
    prices_file: str | None = None

    @property
    def tokens(self) -> list[str]:
        return [t.strip() for t in self.gateway_tokens.split(",") if t.strip()]


def error(status: int, message: str, type_: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    # A lone surrogate quoted back from the request cannot be encoded as UTF-8: escape it, never a 500.
    message = message.encode("utf-8", "backslashreplace").decode()
    return JSONResponse(error_body(message, type_), status_code=status, headers=headers)


def gateway_tenants(settings: GatewaySettings) -> Tenants:
    """Whom the gateway's bearer tokens speak for: the tenants file, or every token of
    ``MOONQ_GATEWAY_TOKENS`` for the one ``default`` tenant (as before tenants).

    Raises:
        ValueError: both are set (which would win is not obvious), or neither.
        ConfigFileError: the tenants file is wrong (naming the field and the rule).
    """
    if settings.tenants_file:
        if settings.tokens:
            raise ValueError(
                f"set {TENANTS_SETTING} or MOONQ_GATEWAY_TOKENS, not both: with a tenants file, tokens are its"
                " tokens_sha256 (docs/tenants.md)"
            )
        return Tenants.load(settings.tenants_file)
    if not settings.tokens:
        raise ValueError("MOONQ_GATEWAY_TOKENS is empty: the gateway serves no one without a bearer token")
    return Tenants.default(settings.tokens)


def principal_of(request: Request) -> Principal:
    """Whom the request's bearer token speaks for (the ``Guard`` put it in the request's state)."""
    return request.state.principal  # type: ignore[no-any-return]


def scope_of(request: Request) -> str | None:
    """The tenant whose jobs the request may see; None: every tenant's (an operator)."""
    principal = principal_of(request)
    return None if principal.operator else principal.tenant


def submit_tenant(request: Request) -> str:
    """The tenant a submit goes to: the token's; an operator's names it in ``X-Moonq-Tenant``."""
    principal, named = principal_of(request), request.headers.get(TENANT_HEADER)
    if named is not None and not principal.operator and named != principal.tenant:
        raise InvalidRequest([(TENANT_HEADER, "only an operator token may submit for another tenant")])
    tenant = named or principal.tenant
    if tenant is None:
        raise InvalidRequest([(TENANT_HEADER, "is required with an operator token: the tenant to submit for")])
    return tenant


class Guard:
    """ASGI middleware: bearer auth (constant-time) and a request size limit, before any route runs.

    The token's ``Principal`` (its tenant, or an operator) goes into the request's state.
    """

    def __init__(self, app: ASGIApp, tenants: Tenants, max_body_bytes: int) -> None:
        self.app = app
        self.tenants = tenants
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path == CONSOLE_PATH or path.startswith(CONSOLE_PATH + "/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        principal = self._principal(headers.get(b"authorization", b""))
        if principal is None:
            response = error(401, "Invalid Authentication", "invalid_authentication_error")
            return await response(scope, receive, send)
        scope.setdefault("state", {})["principal"] = principal
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            response = error(413, f"Invalid request: {BodyTooLarge(self.max_body_bytes)}", "invalid_request_error")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def _principal(self, header: bytes) -> Principal | None:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None
        # Compared by hash against every known token, always (moonq/tenants.py): timing says nothing.
        return self.tenants.by_token(token.strip().decode("utf-8", "replace"))


class BodyTooLarge(InvalidRequest):
    """The body is over ``MOONQ_GATEWAY_MAX_BODY_BYTES``: answered 413, whether declared or streamed."""

    def __init__(self, limit: int) -> None:
        super().__init__([("body", f"is larger than {limit} bytes")])


def _no_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which JSON has not: no peer downstream could send them on.
    raise ValueError(f"{name} is not a JSON value")


# A body up to this size is parsed and validated on the loop (tens of microseconds); a larger one in a
# thread, so a 100 MB request does not stall every other caller's stream meanwhile.
INLINE_BODY_BYTES = 256 * 1024


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read up to ``limit`` bytes (also for chunked bodies without a length)."""
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise BodyTooLarge(limit)
    return bytes(body)


def parse_json(body: bytes) -> Any:
    """``body`` as JSON, or ``InvalidRequest`` saying why not."""
    try:
        return json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidRequest([("request", "is not valid JSON: nested too deeply to parse")]) from None
    except ValueError as err:  # also invalid UTF-8 (UnicodeDecodeError)
        if "integer string conversion" in str(err):  # Python's advice (set_int_max_str_digits) is not the caller's
            raise InvalidRequest([("request", "is not valid JSON: an integer has more than 4300 digits")]) from None
        raise InvalidRequest([("request", f"is not valid JSON: {err}")]) from None


def parse_request(body: bytes) -> ChatRequest:
    return validate_request(parse_json(body))


DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII only ('²'.isdigit() is True); 18 digits stay in Redis' 64 bits


def job_options(request: Request) -> dict[str, Any]:
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= 255:
        raise InvalidRequest([("Idempotency-Key", f"must be 1 to 255 characters (got {len(key)})")])
    options: dict[str, Any] = {"idempotency_key": key, "priority": DEFAULT_PRIORITY}
    raw = request.headers.get("x-moonq-priority")
    if raw is not None:
        options["priority"] = check_priority(raw, "X-Moonq-Priority", text=True)
    hook = request.headers.get("x-moonq-webhook")
    if hook is not None:  # where the job's end is POSTed (docs/webhooks.md); never a field of the body
        options["webhook"] = check_webhook_url(hook, "X-Moonq-Webhook")
    events = request.headers.get("x-moonq-webhook-events")
    if events is not None:  # progress events also POSTed there: "started, retry"
        if hook is None:
            raise InvalidRequest([("X-Moonq-Webhook-Events", "needs X-Moonq-Webhook (the URL the events go to)")])
        options["webhook_events"] = check_webhook_events(events, "X-Moonq-Webhook-Events").split(",")
    builtin = request.headers.get(BUILTIN_TOOLS_HEADER)
    if builtin is not None:  # the worker runs $web_search's round trips (docs/moonshot-api.md §6); never in the body
        options["builtin_tools"] = check_builtin_tools(builtin, None, BUILTIN_TOOLS_HEADER)
    return options


class Gateway:
    """The routes, sharing one ``AsyncClient``."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._client: AsyncClient | None = None

    @property
    def client(self) -> AsyncClient:
        """The shared client, opened on first use: inside a request, so on the loop that serves."""
        if self._client is None:
            self._client = AsyncClient(settings=self.settings)
        return self._client

    async def aclose(self) -> None:
        """Close the client's Redis connections, if it was ever opened (on the loop that opened them)."""
        if self._client is not None:
            await self._client.close()

    async def _submit(self, request: Request) -> tuple[AsyncJob, ChatRequest]:
        raw = await read_body(request, self.settings.gateway_max_body_bytes)
        body = parse_request(raw) if len(raw) <= INLINE_BODY_BYTES else await asyncio.to_thread(parse_request, raw)
        options = job_options(request)
        options["tenant"] = submit_tenant(request)
        check_builtin_tools(options.get("builtin_tools"), body.n, BUILTIN_TOOLS_HEADER)
        job = await self.client.submit(body, **options)
        return job, body

    async def chat_completions(self, request: Request) -> Response:
        job, body = await self._submit(request)
        headers = {"X-Moonq-Job-Id": job.id}
        # The validated request, not the raw body (a non-boolean "stream" was refused by validation).
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            builtin = request.headers.get(BUILTIN_TOOLS_HEADER) is not None
            chunks = ChunkStream(job.id, body.model, int(time.time()), include_usage, builtin_tools=builtin)
            # Starlette's StreamingResponse, whose anyio cancel scope delivers the hang-up's cancel again until the
            # stream ends: on Python 3.11 a single task.cancel() can be lost inside redis-py (asyncio.wait_for in
            # its send, python/cpython#86296), and the stream then ran on to the job's end uncancelled (a plain
            # listener task tried and reverted; tests/test_gateway.py hang-up tests).
            return StreamingResponse(self._stream(job, chunks), media_type="text/event-stream", headers=headers)
        waiter = asyncio.create_task(job.result())
        if not await _finished_before_disconnect(request, waiter):
            await self._disconnected(job)
            return Response(status_code=499)
        try:
            result = waiter.result()
        except JobCancelled:
            return error(409, f"job {job.id} was cancelled", "cancelled")
        except JobFailed as err:
            status = int(err.error.get("status") or 502)
            return JSONResponse(
                error_body(str(err.error.get("message")), str(err.error.get("type"))),
                status_code=status,
                headers=headers,
            )
        # mode="json": a NaN or Infinity an upstream slipped into its answer becomes null, not a 500.
        return JSONResponse(result.model_dump(mode="json", exclude_none=True), headers=headers)

    async def _stream(self, job: AsyncJob, chunks: ChunkStream) -> AsyncIterator[bytes]:
        try:
            async for event in job.events():
                data = chunks.feed(event)
                if data:
                    yield data
                if chunks.done:
                    return
        finally:
            if not chunks.done:  # the caller hung up (Starlette cancelled us) before the end
                await asyncio.shield(self._disconnected(job))

    async def _disconnected(self, job: AsyncJob) -> None:
        if self.settings.gateway_on_disconnect == "cancel":
            await job.cancel()

    async def submit_job(self, request: Request) -> Response:
        job, _ = await self._submit(request)
        return JSONResponse({"id": job.id, "status": await job.status()}, status_code=202)

    async def job(self, request: Request) -> Response:
        return await (self.cancel_job(request) if request.method == "DELETE" else self.get_job(request))

    async def get_job(self, request: Request) -> Response:
        job = self.client.job(request.path_params["job_id"], scope_of(request))
        # Not the request (up to 100 MB): another tenant's job is refused as fast as an unknown one.
        rec = JobRecord.from_redis(await job.record(STATE_FIELDS))
        if rec is None:  # a hash without a status is no job's record
            raise JobNotFound(job.id)
        # The keys are the gateway's JobState (gateway/openapi.py), which names its fields as the record does.
        out: dict[str, Any] = {"id": job.id, "status": rec.status.value, "model": rec.model, "attempt": rec.attempt}
        out["tenant"] = rec.tenant
        times = {"enqueued_at": rec.enqueued_at, "started_at": rec.started_at, "finished_at": rec.finished_at}
        out.update({name: value for name, value in times.items() if value is not None})
        # The record is written by workers from upstream data, which may hold NaN or Infinity (not JSON).
        if rec.status is JobStatus.SUCCEEDED and rec.result is not None:
            out["result"] = json.loads(rec.result, parse_constant=lambda _: None)
        if rec.error:
            out["error"] = json.loads(rec.error, parse_constant=lambda _: None)
        return JSONResponse(out)

    async def job_events(self, request: Request) -> Response:
        job = self.client.job(request.path_params["job_id"], scope_of(request))
        last = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        if not DIGITS.fullmatch(last):
            raise InvalidRequest([("Last-Event-ID", f"must be a sequence number (got {last[:40]!r})")])
        await job.record((JobField.STATUS,))  # 404 for an unknown (or another tenant's) job, before streaming

        async def events() -> AsyncIterator[bytes]:
            async for event in job.events(after_seq=int(last)):
                data = json.dumps(event.model_dump(mode="json", exclude_none=True), ensure_ascii=False)
                yield f"id: {event.seq}\nevent: {event.type}\ndata: {data}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def cancel_job(self, request: Request) -> Response:
        job = self.client.job(request.path_params["job_id"], scope_of(request))
        if await job.cancel():
            return JSONResponse({"id": job.id, "status": JobStatus.CANCELLED.value})
        status = await job.status()
        return error(409, f"job {job.id} has already ended ({status})", "invalid_request_error")


async def _finished_before_disconnect(request: Request, waiter: asyncio.Task[Any]) -> bool:
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.create_task(disconnected())
    done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    # The waiter follows its job in Redis, where a one-shot cancel can be lost (moonq/cancel.py): it would
    # then hold its subscription until the job ends.
    await cancel_and_wait([watcher] if waiter in done else [watcher, waiter])
    return waiter in done


async def _errors(request: Request, exc: Exception) -> Response:
    if isinstance(exc, BodyTooLarge):
        return error(413, f"Invalid request: {exc}", "invalid_request_error")
    if isinstance(exc, InvalidRequest):
        return error(400, f"Invalid request: {exc}", "invalid_request_error")
    if isinstance(exc, JobNotFound):
        return error(404, f"Not found the job {exc}", "resource_not_found_error")
    if isinstance(exc, TenantModelNotAllowed):
        return error(403, f"Permission denied: {exc}", exc.type)
    if isinstance(exc, TenantBudgetExceeded):
        # Retry-After: when the budget is whole again (an SDK that honours it waits; the message says so too).
        retry_after = {"Retry-After": str(budgets.seconds_to_midnight(time.time()))}
        return error(budgets.HTTP_STATUS, str(exc), exc.type, retry_after)
    raise exc


def create_app(settings: GatewaySettings | None = None) -> ASGIApp:
    """The gateway as an ASGI app (serve it with uvicorn; ``moonq gateway`` does)."""
    settings = settings or GatewaySettings()
    tenants = gateway_tenants(settings)
    gw = Gateway(settings)
    routes: list[BaseRoute] = [
        Route("/v1/chat/completions", gw.chat_completions, methods=["POST"]),
        Route("/v1/jobs", gw.submit_job, methods=["POST"]),
        # One route for both methods, so a 405 on the path lists both in its Allow header.
        Route("/v1/jobs/{job_id}", gw.job, methods=["GET", "DELETE"]),
        Route("/v1/jobs/{job_id}/events", gw.job_events, methods=["GET"]),
        Route("/openapi.json", lambda _: JSONResponse(openapi_document()), methods=["GET"]),
        Route("/healthz", lambda _: JSONResponse({"ok": True}), methods=["GET"]),
    ]
    routes += console_routes(lambda: gw.client, tenants=tenants, keys=settings.keys, prices_file=settings.prices_file)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await gw.aclose()

    app = Starlette(
        routes=routes,
        exception_handlers={
            InvalidRequest: _errors,
            JobNotFound: _errors,
            TenantModelNotAllowed: _errors,
            TenantBudgetExceeded: _errors,
        },
        lifespan=lifespan,
    )

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, f"Not found: {request.url.path}", "resource_not_found_error")

    app.add_exception_handler(404, not_found)

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        # RFC 9110: a 405 names the methods the path does support (Starlette puts them on the exception).
        allow = getattr(exc, "headers", None)
        return error(405, f"Method not allowed: {request.method} {request.url.path}", "invalid_request_error", allow)

    app.add_exception_handler(405, method_not_allowed)
    return Guard(app, tenants, settings.gateway_max_body_bytes)


def serve(host: str, port: int) -> None:
    import uvicorn

    # asyncio's loop even where uvloop is installed: under uvloop a write on a connection the peer reset raises
    # RuntimeError, which redis-py does not retry, and the gateway's shared subscription could stop on it.
    uvicorn.run(create_app(), host=host, port=port, log_level="info", proxy_headers=True, loop="asyncio")


__all__ = ["GatewaySettings", "create_app", "serve", "sse"]
