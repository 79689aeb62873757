"""Turning a job's events into the chat-completions stream an OpenAI-compatible SDK expects.

Deltas become ``chat.completion.chunk`` objects as the upstream sent them; the ``completed``
event supplies each choice's finish_reason (and, Moonshot-style, its usage) and, when the
caller asked for ``stream_options.include_usage``, the trailing ``choices: []`` usage chunk;
then ``data: [DONE]``. A ``failed`` or ``cancelled`` event becomes an SSE ``error`` object,
which the OpenAI SDK raises as ``APIError``.

A broken upstream stream that the worker continues with Partial Mode (a ``retry`` event with
``resume: true``: the deltas sent stand) is invisible: the caller's stream goes on with the rest
of the answer, and the role of a choice is sent once. A retry that starts the answer over after
text was already streamed cannot take that text back from the caller, so the stream ends with an
error naming the job (which carries on and can be read at ``/v1/jobs/{id}``); a retry before any
text is invisible. With ``builtin_tools`` on, the worker runs the ``$web_search`` round trips
itself: the builtin calls' fragments are not shown, so such a round is invisible too.

Usage goes on each choice's last chunk as Moonshot does it, except with several choices: the
completed result holds the usage of all of them, so it goes on the last choice's last chunk only
(a client that adds up per-choice usage counts it once).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> bytes:
    """One SSE ``data:`` message. orjson (a dependency of the node already) writes the same compact UTF-8
    JSON several times faster than json, once per relayed chunk; what it refuses (an integer past 64 bits)
    goes through json. A NaN or Infinity (not JSON) is written as null, unless that fallback writes it."""
    try:
        body = orjson.dumps(data)
    except orjson.JSONEncodeError:
        body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    return b"data: " + body + b"\n\n"


def error_body(message: str, type_: str) -> dict[str, Any]:
    """Moonshot's error body."""
    return {"error": {"message": message, "type": type_}}


class ChunkStream:
    """State of one caller's stream: feed events, get SSE bytes."""

    def __init__(
        self, job_id: str, model: str, created: int, include_usage: bool, *, builtin_tools: bool = False
    ) -> None:
        self.job_id = job_id
        self.base = {
            "id": f"cmpl-{job_id.replace('-', '')}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }
        self.include_usage = include_usage
        self.builtin_tools = builtin_tools
        self.sent_deltas = False  # text or a tool call went out: a restart can no longer be hidden
        self.done = False
        self._roles: set[int] = set()  # choices whose role went out
        self._hidden: set[tuple[int, int]] = set()  # (choice, call index) of builtin calls, not shown

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse({**self.base, "choices": choices, **extra})

    def feed(self, event: Any) -> bytes:
        """SSE bytes for one event (possibly empty); sets ``done`` after the last one."""
        if event.type == "delta" and event.delta is not None:
            return self._delta(event.index or 0, event.delta)
        if event.type == "retry":
            self._hidden.clear()  # a new round numbers its calls from 0 again
        if event.type == "retry" and self.sent_deltas and not event.resume:
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

    def _delta(self, index: int, delta: dict[str, Any]) -> bytes:
        shown = dict(delta)
        if "role" in shown and index in self._roles:
            del shown["role"]  # a continued or restarted attempt opens with the role again
        calls = shown.get("tool_calls")
        if self.builtin_tools and isinstance(calls, list):
            kept = [c for c in calls if not self._builtin(index, c)]
            if kept:
                shown["tool_calls"] = kept
            else:
                del shown["tool_calls"]
        if "role" in shown:
            self._roles.add(index)
        elif not any(v not in ("", None) for v in shown.values()):
            return b""  # nothing left to show (a repeated opening, a hidden call's fragment)
        if any(shown.get(k) for k in ("content", "reasoning_content", "tool_calls")):
            self.sent_deltas = True
        return self._chunk([{"index": index, "delta": shown, "finish_reason": None}])

    def _builtin(self, index: int, call: Any) -> bool:
        """Whether a tool-call fragment belongs to a builtin call the worker runs itself."""
        if not isinstance(call, dict):
            return False
        key = (index, int(call["index"]) if isinstance(call.get("index"), int) else 0)
        fn = call.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if (isinstance(name, str) and name.startswith("$")) or call.get("type") == "builtin_function":
            self._hidden.add(key)
        return key in self._hidden

    def _finish(self, result: dict[str, Any]) -> bytes:
        out = []
        usage = result.get("usage")
        choices = result.get("choices") or []
        for i, choice in enumerate(choices):
            final = {"index": choice.get("index", 0), "delta": {}, "finish_reason": choice.get("finish_reason")}
            # Moonshot puts usage on each choice's last chunk; the result's is the total of all choices.
            if usage is not None and i == len(choices) - 1:
                final["usage"] = usage
            out.append(self._chunk([final]))
        if self.include_usage and usage is not None:
            out.append(self._chunk([], usage=usage))
        out.append(DONE)
        return b"".join(out)
