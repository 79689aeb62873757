"""Turning a job's events into the chat-completions stream an OpenAI-compatible SDK expects.

Deltas become ``chat.completion.chunk`` objects as the upstream sent them; the ``completed``
event supplies each choice's finish_reason (and, Moonshot-style, its usage) and, when the
caller asked for ``stream_options.include_usage``, the trailing ``choices: []`` usage chunk;
then ``data: [DONE]``. A ``failed`` or ``cancelled`` event becomes an SSE ``error`` object,
which the OpenAI SDK raises as ``APIError``.

A retry after text was already streamed cannot be taken back from the caller, so the stream
ends with an error naming the job (which carries on and can be read at ``/v1/jobs/{id}``);
a retry before the first delta is invisible.
"""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def error_body(message: str, type_: str) -> dict[str, Any]:
    """Moonshot's error body."""
    return {"error": {"message": message, "type": type_}}


class ChunkStream:
    """State of one caller's stream: feed events, get SSE bytes."""

    def __init__(self, job_id: str, model: str, created: int, include_usage: bool) -> None:
        self.job_id = job_id
        self.base = {
            "id": f"cmpl-{job_id.replace('-', '')}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        self.include_usage = include_usage
        self.sent_deltas = False
        self.done = False

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse({**self.base, "choices": choices, **extra})

    def feed(self, event: Any) -> bytes:
        """SSE bytes for one event (possibly empty); sets ``done`` after the last one."""
        if event.type == "delta" and event.delta is not None:
            self.sent_deltas = True
            return self._chunk([{"index": event.index or 0, "delta": event.delta, "finish_reason": None}])
        if event.type == "retry" and self.sent_deltas:
            self.done = True
            message = (
                f"the upstream stream broke after part of the answer was sent; job {self.job_id} is being"
                f" retried ({event.reason}): read its result at /v1/jobs/{self.job_id}"
            )
            return sse(error_body(message, "stream_interrupted"))
        if event.type == "completed":
            self.done = True
            return self._finish(event.result or {})
        if event.type in ("failed", "cancelled"):
            self.done = True
            err = event.error
            if err is None:
                return sse(error_body(f"job {self.job_id} was cancelled", "cancelled"))
            return sse(error_body(err.message, err.type))
        return b""

    def _finish(self, result: dict[str, Any]) -> bytes:
        out = []
        usage = result.get("usage")
        for choice in result.get("choices") or []:
            final = {"index": choice.get("index", 0), "delta": {}, "finish_reason": choice.get("finish_reason")}
            if usage is not None:
                final["usage"] = usage  # Moonshot puts usage on each choice's last chunk
            out.append(self._chunk([final]))
        if self.include_usage and usage is not None:
            out.append(self._chunk([], usage=usage))
        out.append(DONE)
        return b"".join(out)
