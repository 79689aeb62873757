"""The one network seam to the chat-completions API: aiohttp in, decoded chunks out.

Always streams, whatever the caller asked for, so that every delta can be relayed as it
arrives; the job's own ``stream`` flag only shapes what the caller reads. Transport-level
failures are translated into the ``worker.errors`` tree here and nowhere else.

Why aiohttp and not httpx here: a node reads thousands of chunks a second on one loop, and
reading a chunk through httpx cost 70 us of CPU against aiohttp's 19 us (100 concurrent SSE
streams from the simulator, SSE decoding included; BENCHMARKS.md, "Node performance"). httpx's
pool also rescans every connection per request (encode/httpx#3215), which a node holding a
thousand streams feels. httpx stays the HTTP client everywhere else (gateway tests, CLI, benchmarks).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

if TYPE_CHECKING:
    from worker.accounts import Account

from worker.errors import (
    MAX_TYPE_CHARS,
    StreamInterrupted,
    UpstreamError,
    UpstreamUnavailable,
    error_from_response,
    error_text,
)
from worker.ratelimit import DEFAULT_ACCOUNT
from worker.retry import parse_retry_after
from worker.settings import Settings
from worker.sse import SSEDecoder
from worker.surrogates import may_hold_lone_surrogate, replace_lone_surrogates

DONE = "[DONE]"
# Most of an error answer's body read: the API's own error JSON is a few hundred bytes, a proxy's page a
# few KiB; what is beyond is left unread (the connection is then closed rather than reused).
MAX_ERROR_BODY_BYTES = 64 * 1024


class UpstreamClient:
    """One account's chat-completions endpoint and the connection pool a node's jobs on it share."""

    def __init__(self, settings: Settings, account: Account | None = None) -> None:
        """``account``: whose key and base URL (None: the node's ``MOONSHOT_API_KEY`` and ``MOONSHOT_BASE_URL``)."""
        base_url = (account.base_url if account else None) or settings.moonshot_base_url
        api_key = account.api_key if account else settings.moonshot_api_key
        self.account = account.name if account else DEFAULT_ACCOUNT
        self.url = base_url.rstrip("/") + "/chat/completions"
        # The longest silence between two reads (a thinking model pauses) is stream_chat's own
        # (_Silence), not aiohttp's sock_read; a whole attempt is bounded by the runner's timeout.
        self.read_timeout_s = settings.read_timeout_s
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s, sock_read=None)
        # No pool cap below the node's concurrency (limit=0): every in-flight job holds one connection.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        headers = {"Content-Type": "application/json"}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
        # Made inside the node's loop (Runtime._open), as aiohttp requires.
        self.session = aiohttp.ClientSession(
            timeout=timeout, connector=connector, headers=headers, auto_decompress=True, trust_env=False
        )

    async def aclose(self) -> None:
        await self.session.close()


def upstream_payload(request: dict[str, Any]) -> dict[str, Any]:
    """The body actually sent: the caller's request, streaming, with usage asked for."""
    payload = dict(request)
    payload["stream"] = True
    # Moonshot reports usage per choice anyway; include_usage makes OpenAI-compatible upstreams
    # report it too (as a trailing chunk), so token accounting works on either.
    payload["stream_options"] = {**(request.get("stream_options") or {}), "include_usage": True}
    return payload


async def stream_chat(client: UpstreamClient, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Yield decoded chunks until ``[DONE]``; raise an ``UpstreamError`` on any failure.

    A stream that ends before ``[DONE]`` raises ``StreamInterrupted``: a partial answer is
    never mistaken for a whole one.
    """
    body = json.dumps(upstream_payload(request), ensure_ascii=False).encode()
    silence: _Silence | None = None
    try:
        async with asyncio.timeout(client.read_timeout_s):  # to the answer's headers
            response = await _post(client, body)
        async with response:
            silence = _Silence(response, client.read_timeout_s)
            if response.status != 200:
                error = error_from_response(response.status, await _error_body(response), response.headers)
                error.retry_after_s = parse_retry_after(response.headers, error.message)
                raise error
            decoder = SSEDecoder()
            time = silence.loop.time
            async for raw in response.content.iter_any():
                silence.last = time()
                for event in decoder.feed(raw):
                    if event.data.startswith(DONE):
                        return
                    yield _decode(event.data)
            for event in decoder.flush():
                if event.data.startswith(DONE):
                    return
            raise StreamInterrupted("stream ended without [DONE]", type="incomplete_stream")
    except UpstreamError:
        raise
    except (TimeoutError, aiohttp.ClientError) as err:
        raise _transport_error(err) from err
    finally:
        if silence is not None:
            silence.handle.cancel()


def _transport_error(err: TimeoutError | aiohttp.ClientError) -> UpstreamError:
    """What a transport failure of a call means to the runner."""
    if isinstance(err, (TimeoutError, aiohttp.ServerTimeoutError)):
        # ServerTimeoutError: a connect timeout, or a read's (_Silence). A plain TimeoutError is the wait
        # for the answer's headers: the runner's own attempt timeout cancels the task instead.
        return UpstreamUnavailable(f"upstream timed out: {type(err).__name__}", type="timeout")
    if isinstance(err, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"cannot reach upstream: {err}", type="connection_error")
    if isinstance(err, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return StreamInterrupted(f"connection dropped: {err}", type="connection_dropped")
    return UpstreamUnavailable(f"cannot reach upstream: {err}", type="connection_error")


class _Silence:
    """A stream's read timeout: fails the read pending when nothing arrived for ``limit`` seconds.

    aiohttp's ``sock_read`` cancels and re-arms a timer for every read, and a node reads thousands
    of fragments a second; here the reader only notes the time of each read (``last``), and one
    timer per ``limit`` of silence checks it: when it finds the stream silent that long, it fails
    the read with the error ``sock_read`` raises (``ServerTimeoutError``) and drops the connection.
    """

    __slots__ = ("_response", "handle", "last", "limit", "loop")

    def __init__(self, response: aiohttp.ClientResponse, limit: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.limit = limit
        self._response = response
        self.handle = self.loop.call_at(self.last + limit, self._check)

    def _check(self) -> None:
        if self.loop.time() - self.last < self.limit:
            self.handle = self.loop.call_at(self.last + self.limit, self._check)
            return
        self._response.content.set_exception(aiohttp.ServerTimeoutError("Timeout on reading data from socket"))
        self._response.close()  # not reusable: the rest of the answer may still come


async def _post(client: UpstreamClient, body: bytes) -> aiohttp.ClientResponse:
    """POST the body; a failed connect (nothing sent yet) is tried once more, the rest is the runner's."""
    try:
        return await client.session.post(client.url, data=body)
    except aiohttp.ClientConnectorError:
        return await client.session.post(client.url, data=body)


async def _error_body(response: aiohttp.ClientResponse) -> bytes:
    """The first ``MAX_ERROR_BODY_BYTES`` of an error answer's body (all of it, if shorter)."""
    body = bytearray()
    while len(body) < MAX_ERROR_BODY_BYTES:
        block = await response.content.read(MAX_ERROR_BODY_BYTES - len(body))
        if not block:
            break
        body += block
    return bytes(body)


def _no_constant(name: str) -> None:
    """NaN and +/-Infinity are not JSON: read as null, so they never reach an event or a record."""
    return None


def _decode(data: str) -> dict[str, Any]:
    """One event's data as a chunk: JSON, no NaN or Infinity, no lone surrogate (made U+FFFD)."""
    try:
        # orjson refuses what json reads differently (NaN, Infinity, a lone surrogate, too deep a
        # nesting): those go through json, which reads them as this function says.
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            chunk = json.loads(data, parse_constant=_no_constant)
        except (ValueError, RecursionError) as err:
            raise StreamInterrupted(f"undecodable chunk: {data[:200]!r}", type="invalid_chunk") from err
    if may_hold_lone_surrogate(data):
        # Valid JSON, but such a str cannot be encoded as UTF-8 for Redis: one bad string must not fail
        # the pipeline the whole process shares (worker/surrogates.py).
        chunk = replace_lone_surrogates(chunk)
    if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
        # An error sent inside the stream (the OpenAI SDK treats it the same way).
        err_obj = chunk["error"]
        raise UpstreamUnavailable(
            error_text(err_obj.get("message", "")), type=error_text(err_obj.get("type", "stream_error"), MAX_TYPE_CHARS)
        )
    if not isinstance(chunk, dict):
        raise StreamInterrupted(f"undecodable chunk: {data[:200]!r}", type="invalid_chunk")
    return chunk
