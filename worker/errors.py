"""Errors from the upstream, as one tree with a ``retryable`` flag.

    MoonqError                          (moonq.errors)
    └── UpstreamError                   any failed call; status, type, request_id, retry_after_s
        ├── RateLimited          retry  429 rate_limit_reached_error / engine_overloaded_error
        ├── UpstreamUnavailable  retry  408, 409, 5xx, timeouts, connection errors
        ├── UpstreamRejected     final  400/401/403/404/422, 429 exceeded_current_quota_error
        ├── StreamInterrupted    retry  stream cut: no [DONE], no finish_reason, undecodable chunk
        └── CapacityWaitTimeout  final  no fleet capacity within MOONQ_CAPACITY_WAIT_S (no call made)

The retry code reads only ``retryable``; ``error_from_response`` is the one place that maps an
HTTP answer to a class. ``info()`` is what a ``failed`` event and the job record carry.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from moonq.errors import MoonqError
from worker.surrogates import replace_lone_surrogates

# What a failed event and the job record keep of an upstream's error message and type: the API's are a
# line or two; a hostile or broken upstream's may be anything (a whole page, a megabyte of JSON string).
MAX_MESSAGE_CHARS = 2000
MAX_TYPE_CHARS = 100


class UpstreamError(MoonqError):
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        type: str = "upstream_error",
        status: int | None = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.type = type
        self.status = status
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        self.account: str | None = None  # the upstream account that answered (set by the node's runner)

    def info(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message, "status": self.status}


class RateLimited(UpstreamError):
    retryable = True


class UpstreamUnavailable(UpstreamError):
    retryable = True


class UpstreamRejected(UpstreamError):
    retryable = False


class StreamInterrupted(UpstreamError):
    retryable = True

    def __init__(self, message: str, *, type: str = "stream_interrupted", **kw: Any) -> None:
        super().__init__(message, type=type, **kw)


class CapacityWaitTimeout(UpstreamError):
    """The wait for fleet capacity (the limiter) outlasted ``MOONQ_CAPACITY_WAIT_S``: nothing was sent."""

    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message, type="capacity_wait_timeout_error")


# Quota exhaustion is a billing state, not congestion: waiting does not help.
FINAL_429_TYPES = frozenset({"exceeded_current_quota_error"})


def error_text(value: Any, limit: int = MAX_MESSAGE_CHARS) -> str:
    """An upstream's error field as text fit to store: at most ``limit`` characters, no lone surrogate."""
    text: str = replace_lone_surrogates(str(value)[:limit])
    return text


def _parse_error_body(body: bytes) -> tuple[str, str]:
    try:
        data = json.loads(body)
        err = data["error"]
        return error_text(err.get("type") or "upstream_error", MAX_TYPE_CHARS), error_text(err.get("message") or "")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        text = body.decode("utf-8", errors="replace").strip()
        return "upstream_error", text[:500]


def error_from_response(status: int, body: bytes, headers: Any = None) -> UpstreamError:
    """Map an upstream HTTP error answer to its class, keeping the upstream's type and message."""
    err_type, message = _parse_error_body(body)
    request_id = headers.get("msh-request-id") if headers is not None else None
    kw: dict[str, Any] = {"type": err_type, "status": status, "request_id": request_id}
    message = message or f"HTTP {status}"
    if status == 429:
        cls: type[UpstreamError] = UpstreamRejected if err_type in FINAL_429_TYPES else RateLimited
    elif status in (408, 409) or status >= 500:
        cls = UpstreamUnavailable
    else:
        cls = UpstreamRejected
    return cls(message, **kw)


class UnknownAccount(MoonqError, LookupError):
    """An account name that the node does not have."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"unknown account {name[:64]!r}: not configured on this node")
