"""Assemble streamed chunks into the API's non-stream response shape (pure, no I/O).

``feed`` takes one decoded chunk and returns the deltas worth publishing; ``finish`` returns
the completion once the stream said ``[DONE]``. Usage is read from wherever the upstream put
it: Moonshot puts it inside each choice's final chunk (``choices[i].usage``), OpenAI-style
upstreams in a trailing ``choices: []`` chunk (``usage``); some send both (docs/moonshot-api.md §4).
A usage with a count that is not one (``worker.usage.usage_problem``: "12 tokens", negative, NaN,
beyond any context) makes the stream's usage unknown, as if none was reported: the answer itself
arrived whole, and retrying would bill another call for the same bad number.
Fields we do not know are kept: on the chunk, on the delta and on tool-call fragments.

Tool calls are joined the way any OpenAI-compatible upstream streams them: Moonshot sends a call's
``id``, ``type`` and ``function.name`` once, in its first fragment (docs/moonshot-api.md §4), but
some upstreams repeat them in every fragment, and some repeat the id as ``""``. The first id and
type that say something win, and a name that repeats the one already read is not appended again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worker.errors import StreamInterrupted
from worker.usage import usage_problem

_TOP_LEVEL_SKIP = {"choices", "usage", "object"}
# Tool-call fields an upstream may repeat in later fragments: the first that says something stands.
_FIRST_WINS = ("id", "type")


@dataclass
class _ToolCall:
    fields: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def add(self, fragment: dict[str, Any]) -> None:
        fn = fragment.get("function") or {}
        name = fn.get("name") or ""
        if name and name != self.name:  # a name in pieces is joined; a repeated one is not doubled
            self.name += name
        self.arguments.append(fn.get("arguments") or "")
        for key, value in fragment.items():
            if key in ("index", "function") or value is None or value == "":
                continue
            if key in _FIRST_WINS and self.fields.get(key):
                continue
            self.fields[key] = value

    def build(self) -> dict[str, Any]:
        call = {"id": "", "type": "function", **self.fields}
        call["function"] = {"name": self.name, "arguments": "".join(self.arguments)}
        return call


@dataclass
class _Choice:
    role: str = "assistant"
    texts: dict[str, list[str]] = field(default_factory=dict)  # content, reasoning_content, ...
    other: dict[str, Any] = field(default_factory=dict)
    tool_calls: dict[int, _ToolCall] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None

    def add(self, delta: dict[str, Any]) -> None:
        for key, value in delta.items():
            if key == "role" and value:
                self.role = value
            elif key == "tool_calls" and value:
                for frag in value:
                    self.tool_calls.setdefault(int(frag.get("index", 0)), _ToolCall()).add(frag)
            elif isinstance(value, str):
                self.texts.setdefault(key, []).append(value)
            elif value is not None:
                self.other[key] = value

    def build(self, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": None, **self.other}
        for key, parts in self.texts.items():
            message[key] = "".join(parts)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i].build() for i in sorted(self.tool_calls)]
        return {"index": index, "message": message, "finish_reason": self.finish_reason}


def combine_choice_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """One usage from per-choice usages: the prompt is shared, completions add up."""
    first = dict(usages[0])
    if len(usages) > 1:
        completion = sum(int(u.get("completion_tokens") or 0) for u in usages)
        first["completion_tokens"] = completion
        first["total_tokens"] = int(first.get("prompt_tokens") or 0) + completion
    return first


class StreamAssembler:
    """Accumulates one upstream stream; one instance per attempt."""

    def __init__(self) -> None:
        self._meta: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._usage: dict[str, Any] | None = None
        self.chunks = 0
        self.usage_problem: str | None = None  # the first usage that could not be counted, and why

    def feed(self, chunk: Any) -> list[tuple[int, dict[str, Any]]]:
        """Take one chunk; return ``(choice index, delta)`` pairs that carry something."""
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices", []), list):
            raise StreamInterrupted(f"undecodable chunk: {str(chunk)[:200]}", type="invalid_chunk")
        self.chunks += 1
        for key, value in chunk.items():
            if key not in _TOP_LEVEL_SKIP and key not in self._meta:
                self._meta[key] = value
        if isinstance(chunk.get("usage"), dict) and self._countable(chunk["usage"]):
            self._usage = chunk["usage"]
        out: list[tuple[int, dict[str, Any]]] = []
        for raw in chunk.get("choices") or []:
            if not isinstance(raw, dict):
                raise StreamInterrupted(f"undecodable choice: {str(raw)[:200]}", type="invalid_chunk")
            index = int(raw.get("index", 0))
            state = self._choices.setdefault(index, _Choice())
            delta = raw.get("delta") or {}
            if delta:
                state.add(delta)
                out.append((index, delta))
            if raw.get("finish_reason"):
                state.finish_reason = raw["finish_reason"]
            if isinstance(raw.get("usage"), dict) and self._countable(raw["usage"]):
                state.usage = raw["usage"]
        return out

    def _countable(self, usage: dict[str, Any]) -> bool:
        problem = usage_problem(usage)
        if problem is not None and self.usage_problem is None:
            self.usage_problem = problem
        return problem is None

    def finish_reasons(self) -> dict[int, str | None]:
        """Each choice seen so far and its finish_reason (None while it is unfinished)."""
        return {i: c.finish_reason for i, c in sorted(self._choices.items())}

    def usage(self) -> dict[str, Any] | None:
        """The stream's usage; None when none was reported or any report could not be counted."""
        if self.usage_problem is not None:
            return None
        if self._usage is not None:
            return self._usage
        per_choice = [c.usage for _, c in sorted(self._choices.items()) if c.usage is not None]
        return combine_choice_usage(per_choice) if per_choice else None

    def finish(self) -> dict[str, Any]:
        """The completion, once ``[DONE]`` arrived; every choice must have a finish_reason."""
        if not self._choices:
            raise StreamInterrupted("stream ended without any choice", type="incomplete_stream")
        unfinished = [i for i, c in self._choices.items() if c.finish_reason is None]
        if unfinished:
            raise StreamInterrupted(
                f"stream ended without finish_reason for choice {unfinished}", type="incomplete_stream"
            )
        completion: dict[str, Any] = {**self._meta, "object": "chat.completion"}
        completion["choices"] = [c.build(i) for i, c in sorted(self._choices.items())]
        usage = self.usage()
        if usage is not None:
            completion["usage"] = usage
        return completion
