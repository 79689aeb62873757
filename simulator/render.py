"""Response bodies: the non-stream completion (§3) and the list of stream chunks (§4), as plain dicts.

Pure functions; the HTTP layer serialises and paces them. Keys are ordered like the API's own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any

from simulator.catalog import CacheStyle
from simulator.finish import Outcome
from simulator.generate import ToolCall
from simulator.tokens import pieces

Json = dict[str, Any]


@dataclass(frozen=True)
class Meta:
    model: str
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def usage(prompt: int, completion: int, cached: int, style: CacheStyle) -> Json:
    out: Json = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if style in (CacheStyle.TOP, CacheStyle.BOTH):
        out["cached_tokens"] = cached
    if style in (CacheStyle.NESTED, CacheStyle.BOTH):
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def completion_body(meta: Meta, outcomes: list[Outcome], total: Json, thinking: bool) -> Json:
    choices = [
        {"index": i, "message": _message(outcome, thinking), "finish_reason": outcome.finish_reason}
        for i, outcome in enumerate(outcomes)
    ]
    return {**_head(meta, "chat.completion"), "choices": choices, "usage": total}


def stream_chunks(
    meta: Meta, outcomes: list[Outcome], usages: list[Json], total: Json | None, next_size: Callable[[], int]
) -> list[Json]:
    """All chunks of a stream, choices interleaved; ``total`` set means include_usage was asked."""
    per_choice = [_choice_deltas(i, o, u, next_size) for i, (o, u) in enumerate(zip(outcomes, usages, strict=True))]
    interleaved = [c for row in zip_longest(*per_choice) for c in row if c is not None]
    # With include_usage the spec has every ordinary chunk carry "usage": null (docs/moonshot-api.md §4).
    extra: Json = {"usage": None} if total is not None else {}
    chunks = [{**_head(meta, "chat.completion.chunk"), "choices": [choice], **extra} for choice in interleaved]
    if total is not None:
        chunks.append({**_head(meta, "chat.completion.chunk"), "choices": [], "usage": total})
    return chunks


def _head(meta: Meta, kind: str) -> Json:
    return {"id": meta.id, "object": kind, "created": meta.created, "model": meta.model}


def _message(outcome: Outcome, thinking: bool) -> Json:
    message: Json = {"role": "assistant", "content": outcome.content}
    if thinking:
        message["reasoning_content"] = outcome.reasoning
    if outcome.tool_calls:
        message["tool_calls"] = [
            {"id": call.id, "type": call.type, "function": {"name": call.name, "arguments": call.arguments}}
            for call in outcome.tool_calls
        ]
    return message


def _choice_deltas(index: int, outcome: Outcome, choice_usage: Json, next_size: Callable[[], int]) -> list[Json]:
    def delta(body: Json) -> Json:
        return {"index": index, "delta": body, "finish_reason": None}

    out = [delta({"role": "assistant", "content": ""})]
    out += [delta({"reasoning_content": text}) for text in _fragments(outcome.reasoning, next_size)]
    out += [delta({"content": text}) for text in _fragments(outcome.content, next_size)]
    for j, call in enumerate(outcome.tool_calls):
        out += [delta({"tool_calls": [fragment]}) for fragment in _call_fragments(j, call, next_size)]
    # Moonshot puts usage in each choice's final chunk even without stream_options (§4).
    out.append({"index": index, "delta": {}, "finish_reason": outcome.finish_reason, "usage": choice_usage})
    return out


def _fragments(text: str, next_size: Callable[[], int]) -> Iterator[str]:
    parts = pieces(text)
    start = 0
    while start < len(parts):
        size = next_size()
        yield "".join(parts[start : start + size])
        start += size


def _call_fragments(index: int, call: ToolCall, next_size: Callable[[], int]) -> list[Json]:
    head = {"index": index, "id": call.id, "type": call.type, "function": {"name": call.name, "arguments": ""}}
    texts = list(_fragments(call.arguments, next_size))
    if len(texts) == 1 and len(texts[0]) > 1:
        # Arguments always arrive in pieces the client must concatenate, even short ones.
        half = len(texts[0]) // 2
        texts = [texts[0][:half], texts[0][half:]]
    return [head, *({"index": index, "function": {"arguments": text}} for text in texts)]
