"""The one network seam to the chat-completions API: httpx in, decoded chunks out.

Always streams, whatever the caller asked for, so that every delta can be relayed as it
arrives; the job's own ``stream`` flag only shapes what the caller reads. Transport-level
failures are translated into the ``worker.errors`` tree here and nowhere else.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from worker.errors import StreamInterrupted, UpstreamError, UpstreamUnavailable, error_from_response
from worker.retry import parse_retry_after
from worker.settings import Settings
from worker.sse import SSEDecoder

DONE = "[DONE]"


def build_client(settings: Settings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s)
    # No pool cap below the node's concurrency: every in-flight job holds one connection.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=max(settings.concurrency, 20))
    # Connect failures are the one retry httpx owns (nothing was sent yet); the task owns the rest.
    transport = httpx.AsyncHTTPTransport(retries=1, limits=limits)
    headers = {"Content-Type": "application/json"}
    if settings.moonshot_api_key is not None:
        headers["Authorization"] = f"Bearer {settings.moonshot_api_key.get_secret_value()}"
    return httpx.AsyncClient(
        base_url=settings.moonshot_base_url.rstrip("/") + "/", timeout=timeout, transport=transport, headers=headers
    )


def upstream_payload(request: dict[str, Any]) -> dict[str, Any]:
    """The body actually sent: the caller's request, streaming, with usage asked for."""
    payload = dict(request)
    payload["stream"] = True
    # Moonshot reports usage per choice anyway; include_usage makes OpenAI-compatible upstreams
    # report it too (as a trailing chunk), so token accounting works on either.
    payload["stream_options"] = {**(request.get("stream_options") or {}), "include_usage": True}
    return payload


async def stream_chat(client: httpx.AsyncClient, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Yield decoded chunks until ``[DONE]``; raise an ``UpstreamError`` on any failure.

    A stream that ends before ``[DONE]`` raises ``StreamInterrupted``: a partial answer is
    never mistaken for a whole one.
    """
    try:
        async with client.stream("POST", "chat/completions", json=upstream_payload(request)) as response:
            if response.status_code != 200:
                error = error_from_response(response.status_code, await response.aread(), response.headers)
                error.retry_after_s = parse_retry_after(response.headers, error.message)
                raise error
            decoder = SSEDecoder()
            async for raw in response.aiter_raw():
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
    except httpx.TimeoutException as err:
        raise UpstreamUnavailable(f"upstream timed out: {type(err).__name__}", type="timeout") from err
    except (httpx.RemoteProtocolError, httpx.ReadError) as err:
        raise StreamInterrupted(f"connection dropped: {err}", type="connection_dropped") from err
    except httpx.TransportError as err:
        raise UpstreamUnavailable(f"cannot reach upstream: {err}", type="connection_error") from err


def _decode(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError as err:
        raise StreamInterrupted(f"undecodable chunk: {data[:200]!r}", type="invalid_chunk") from err
    if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
        # An error sent inside the stream (the OpenAI SDK treats it the same way).
        err_obj = chunk["error"]
        raise UpstreamUnavailable(str(err_obj.get("message", "")), type=str(err_obj.get("type", "stream_error")))
    if not isinstance(chunk, dict):
        raise StreamInterrupted(f"undecodable chunk: {data[:200]!r}", type="invalid_chunk")
    return chunk
