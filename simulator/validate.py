"""Request validation: a JSON body in, a checked ``ChatRequest`` out, or an ``ApiError`` raised.

Checks run in the order the real API appears to apply them: body shape, model, messages, then the
sampling/thinking/tool parameters, and the context-window check last because it needs the prompt
size. Unknown top-level fields are accepted and ignored, as the real API does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simulator.catalog import ModelSpec, Thinking, lookup
from simulator.errors import invalid_request, model_not_found, rejected
from simulator.messages import Message, check_messages, check_reasoning_kept, partial_prefix
from simulator.tokens import prompt_tokens
from simulator.tooldefs import WEB_SEARCH, Tool, check_tool_choice, check_tools, tool_name

MAX_STOP_STRINGS = 5
MAX_STOP_BYTES = 32
MAX_N = 5
# "When temperature is very small and close to 0, only 1 result can be returned" (API reference).
NEAR_ZERO_TEMPERATURE = 0.01
REASONING_EFFORTS = ("low", "high", "max")
# k2.5/k2.6 pin these; temperature is pinned separately because it depends on thinking.
_PINNED = {"top_p": 0.95, "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0}

ResponseFormat = tuple[str, dict[str, Any]]  # ("json_object" | "json_schema", schema or {})


@dataclass(frozen=True)
class ChatRequest:
    model: str
    spec: ModelSpec
    messages: list[Message]
    tools: list[Tool]
    tool_choice: str
    forced_tool: str | None
    thinking: bool
    reasoning_effort: str | None
    n: int
    stop: tuple[str, ...]
    response_format: ResponseFormat | None
    stream: bool
    include_usage: bool
    prompt_cache_key: str | None
    prompt_tokens: int
    max_completion_tokens: int  # the effective budget: requested, else the model default


def parse_chat_request(body: Any) -> ChatRequest:
    body = _require_object(body)
    spec = _model(body)
    messages = check_messages(body.get("messages"), spec)
    thinking, effort = _thinking(body, spec)
    n = _check_sampling(body, spec, thinking)
    tools = check_tools(body.get("tools"))
    tool_choice, forced_tool = check_tool_choice(body.get("tool_choice"), tools, spec, thinking)
    response_format = _response_format(body.get("response_format"))
    _check_combinations(messages, tools, response_format, spec, thinking)
    stream, include_usage = _stream(body)
    prompt = prompt_tokens(messages, tools)
    return ChatRequest(
        model=spec.id,
        spec=spec,
        messages=messages,
        tools=tools,
        tool_choice=tool_choice,
        forced_tool=forced_tool,
        thinking=thinking,
        reasoning_effort=effort,
        n=n,
        stop=_stop(body.get("stop")),
        response_format=response_format,
        stream=stream,
        include_usage=include_usage,
        prompt_cache_key=_optional_str(body, "prompt_cache_key"),
        prompt_tokens=prompt,
        max_completion_tokens=_budget(body, spec, prompt),
    )


def parse_estimate_request(body: Any) -> int:
    """Validates a token-estimate body (same shape as chat) and returns its prompt tokens."""
    body = _require_object(body)
    spec = _model(body)
    messages = check_messages(body.get("messages"), spec)
    return prompt_tokens(messages, check_tools(body.get("tools")))


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid_request("the request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> ModelSpec:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request("model is required")
    spec = lookup(model)
    if spec is None:
        raise model_not_found(model)
    return spec


def _thinking(body: dict[str, Any], spec: ModelSpec) -> tuple[bool, str | None]:
    raw = body.get("thinking")
    kind = raw.get("type") if isinstance(raw, dict) else None
    if (raw is not None and not isinstance(raw, dict)) or kind not in (None, "enabled", "disabled"):
        raise invalid_request('thinking must be {"type": "enabled"} or {"type": "disabled"}')
    if spec.thinking is Thinking.ENABLED_ONLY and kind == "disabled":
        raise rejected("invalid thinking: only type=enabled is allowed for this model")
    if spec.thinking is Thinking.DEFAULT_ON:
        return kind != "disabled", None
    if spec.thinking is not Thinking.EFFORT:
        return spec.thinking is not Thinking.NEVER, None
    effort = body.get("reasoning_effort") or "high"
    if effort not in REASONING_EFFORTS:
        raise invalid_request(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}")
    return True, effort


def _number(body: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_request(f"{key} must be a number")
    if not low <= value <= high:
        raise invalid_request(f"{key} must be in [{low:g}, {high:g}], got {value}")
    return float(value)


def _check_sampling(body: dict[str, Any], spec: ModelSpec, thinking: bool) -> int:
    if spec.fixed_sampling:
        pinned = {"temperature": 1.0 if thinking else 0.6, **_PINNED}
        for key, wanted in pinned.items():
            if body.get(key) is not None and body[key] != wanted:
                raise rejected(f"invalid {key}: only {wanted:g} is allowed for this model")
    temperature = _number(body, "temperature", 0, 1)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    n = 1 if body.get("n") is None else body["n"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise invalid_request(f"n must be an integer between 1 and {MAX_N}, got {n!r}")
    if n > 1 and temperature is not None and temperature < NEAR_ZERO_TEMPERATURE:
        raise invalid_request("n > 1 is not supported when temperature is close to 0")
    return n


def _response_format(raw: Any) -> ResponseFormat | None:
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return kind, {}
    if kind != "json_schema":
        raise invalid_request(f"response_format.type must be text, json_object or json_schema, got {kind!r}")
    spec = raw.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise invalid_request("response_format.json_schema.schema must be an object")
    return kind, spec["schema"]


def _check_combinations(
    messages: list[Message], tools: list[Tool], fmt: ResponseFormat | None, spec: ModelSpec, thinking: bool
) -> None:
    if fmt is not None and fmt[0] == "json_object" and partial_prefix(messages) is not None:
        raise invalid_request("partial mode cannot be used with response_format json_object")
    if thinking:
        check_reasoning_kept(messages)
    # $web_search does not work with k2.5/k2.6 thinking; the docs say to disable thinking.
    if thinking and spec.thinking is Thinking.DEFAULT_ON and any(tool_name(t) == WEB_SEARCH for t in tools):
        raise invalid_request("$web_search is not supported when thinking is enabled; disable thinking to use it")


def _stop(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise invalid_request("stop must be a string or a list of strings")
    if len(items) > MAX_STOP_STRINGS:
        raise invalid_request(f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(items)}")
    for item in items:
        if len(item.encode()) > MAX_STOP_BYTES:
            raise invalid_request(f"each stop string must be at most {MAX_STOP_BYTES} bytes, {item!r} is longer")
    return tuple(item for item in items if item)


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_request("stream must be a boolean")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid_request("stream_options must be an object")
    return bool(stream), bool(options and options.get("include_usage"))


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise invalid_request(f"{key} must be a string")
    return value


def _budget(body: dict[str, Any], spec: ModelSpec, prompt: int) -> int:
    # max_completion_tokens wins over the deprecated max_tokens when both are sent.
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    requested = body.get(key)
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
        raise invalid_request(f"{key} must be a positive integer")
    if prompt + (requested or 0) > spec.context_length or prompt >= spec.context_length:
        raise invalid_request(f"Your request exceeded model token limit : {spec.context_length}")
    return requested if requested is not None else min(spec.default_max_completion_tokens, spec.context_length - prompt)
