"""Request validation: strict on documented fields, open to unknown ones, nothing enqueued on error."""

from __future__ import annotations

from typing import Any

import pytest
import redis

import producers
from moonq.request import validate_request
from producers import Client, InvalidRequest
from worker.settings import Settings

USER = [{"role": "user", "content": "hi"}]
FN = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
PNG = "data:image/png;base64,iVBORw0KGgo="

# (name, request, field named in the message, words of the rule)
BAD_INPUTS: list[tuple[str, Any, str, str]] = [
    (
        "empty content",
        {"model": "m", "messages": [{"role": "user", "content": ""}]},
        "messages.0.content",
        "must not be empty",
    ),
    (
        "unknown role",
        {"model": "m", "messages": [{"role": "bot", "content": "x"}]},
        "messages.0.role",
        "must be one of",
    ),
    ("no messages", {"model": "m", "messages": []}, "messages", "at least 1"),
    ("6 stop words", {"model": "m", "messages": USER, "stop": list("abcdef")}, "stop", "at most 5 stop words"),
    ("33-byte stop word", {"model": "m", "messages": USER, "stop": ["é" * 16 + "x"]}, "stop", "at most 32 bytes"),
    ("129 tools", {"model": "m", "messages": USER, "tools": [FN] * 129}, "tools", "at most 128"),
    ("non-numeric temperature", {"model": "m", "messages": USER, "temperature": "hot"}, "temperature", "valid number"),
    ("missing model", {"messages": USER}, "model", "is required"),
    (
        "unknown response_format",
        {"model": "m", "messages": USER, "response_format": {"type": "yaml"}},
        "response_format.type",
        "'json_object'",
    ),
    (
        "image part without url",
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages.0.content.0.image_url.url",
        "is required",
    ),
    ("non-object request", ["model", "m"], "request", "must be a JSON object"),
]

MORE_BAD: list[tuple[str, Any, str, str]] = [
    (
        "temperature above 1",
        {"model": "m", "messages": USER, "temperature": 1.5},
        "temperature",
        "less than or equal to 1",
    ),
    ("bool temperature", {"model": "m", "messages": USER, "temperature": True}, "temperature", "valid number"),
    ("n out of range", {"model": "m", "messages": USER, "n": 6}, "n", "less than or equal to 5"),
    ("penalty out of range", {"model": "m", "messages": USER, "presence_penalty": -3}, "presence_penalty", "-2"),
    (
        "remote image url",
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}
            ],
        },
        "messages.0.content.0.image_url.url",
        "remote http(s) URLs are not supported",
    ),
    (
        "unknown part type",
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        "messages.0.content.0.type",
        "'video_url'",
    ),
    (
        "bad tool name",
        {"model": "m", "messages": USER, "tools": [{"type": "function", "function": {"name": "9lives"}}]},
        "tools.0.function.name",
        "does not match",
    ),
    (
        "tool params not object",
        {
            "model": "m",
            "messages": USER,
            "tools": [{"type": "function", "function": {"name": "abc", "parameters": {"type": "array"}}}],
        },
        "tools.0.function.parameters",
        "root type is 'object'",
    ),
    (
        "partial not last",
        {"model": "m", "messages": [{"role": "assistant", "content": "a", "partial": True}, *USER]},
        "messages.0.partial",
        "last message",
    ),
    (
        "partial on user",
        {"model": "m", "messages": [{"role": "user", "content": "a", "partial": True}]},
        "messages.0.partial",
        "assistant",
    ),
    (
        "partial with json mode",
        {
            "model": "m",
            "messages": [*USER, {"role": "assistant", "content": "", "partial": True}],
            "response_format": {"type": "json_object"},
        },
        "response_format",
        "Partial Mode",
    ),
    (
        "tool result without call",
        {"model": "m", "messages": [*USER, {"role": "tool", "tool_call_id": "t:0", "content": "x"}]},
        "messages.1.tool_call_id",
        "answers no tool call",
    ),
    (
        "tool message without id",
        {"model": "m", "messages": [{"role": "tool", "content": "x"}]},
        "messages.0.tool_call_id",
        "is required",
    ),
    (
        "both max_tokens",
        {"model": "m", "messages": USER, "max_tokens": 1, "max_completion_tokens": 1},
        "max_tokens",
        "set only one",
    ),
    (
        "named tool not offered",
        {
            "model": "m",
            "messages": USER,
            "tools": [FN],
            "tool_choice": {"type": "function", "function": {"name": "other"}},
        },
        "tool_choice.function.name",
        "not among the offered tools",
    ),
    (
        "json_schema without schema",
        {"model": "m", "messages": USER, "response_format": {"type": "json_schema"}},
        "response_format.json_schema",
        "is required",
    ),
    ("thinking type", {"model": "m", "messages": USER, "thinking": {"type": "maybe"}}, "thinking.type", "'enabled'"),
    ("empty model", {"model": "", "messages": USER}, "model", "at least 1 character"),
]


@pytest.mark.parametrize(
    ("name", "request_", "field", "rule"), BAD_INPUTS + MORE_BAD, ids=[b[0] for b in BAD_INPUTS + MORE_BAD]
)
def test_rejected_with_field_and_rule(name: str, request_: Any, field: str, rule: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_request(request_)
    assert f"{field}: " in str(info.value), str(info.value)
    assert rule in str(info.value), str(info.value)


@pytest.mark.parametrize(("name", "request_", "field", "rule"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_nothing_is_enqueued_on_bad_input(
    fresh_prefix: Settings, r: redis.Redis, name: str, request_: Any, field: str, rule: str
) -> None:
    with Client(settings=fresh_prefix) as client, pytest.raises(InvalidRequest, match=rule):
        client.submit(request_)
    assert r.keys(f"{fresh_prefix.prefix}:*") == []


def test_every_feature_validates_and_passes_through_unchanged() -> None:
    request = {
        "model": "kimi-k2.5",
        "messages": [
            {"role": "system", "content": "You are Kimi."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these?"},
                    {"type": "image_url", "image_url": {"url": PNG, "detail": "high"}},
                    {"type": "image_url", "image_url": "ms://file-abc"},
                    {"type": "video_url", "video_url": {"url": "ms://file-vid"}},
                ],
            },
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "r",
                "tool_calls": [
                    {"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "get_weather:0", "name": "get_weather", "content": "sunny"},
            {"role": "assistant", "content": "", "name": "Kimi", "partial": True},
        ],
        "tools": [FN, {"type": "builtin_function", "function": {"name": "$web_search"}}],
        "tool_choice": "auto",
        "thinking": {"type": "enabled", "keep": "all"},
        "stop": ["\n\n", "END"],
        "temperature": 1.0,
        "top_p": 0.95,
        "n": 1,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "prompt_cache_key": "session-42",
        "safety_identifier": "user-hash-1",
        "max_completion_tokens": 32768,
        "a_future_field": {"nested": [1, 2]},
    }
    assert validate_request(request).to_payload() == request


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "text"},
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {"type": "object"}}},
    ],
)
def test_response_formats(fmt: dict[str, Any]) -> None:
    assert (
        validate_request({"model": "m", "messages": USER, "response_format": fmt}).to_payload()["response_format"]
        == fmt
    )


def test_deprecated_max_tokens_is_mapped() -> None:
    # Issue 14: sent as the caller wrote it (an upstream honouring one spelling only must see the caller's).
    payload = validate_request({"model": "m", "messages": USER, "max_tokens": 64}).to_payload()
    assert payload["max_tokens"] == 64 and "max_completion_tokens" not in payload


def test_defaults_are_not_injected() -> None:
    assert validate_request({"model": "m", "messages": USER}).to_payload() == {"model": "m", "messages": USER}


def test_public_surface() -> None:
    assert producers.__all__ == sorted(producers.__all__)
    assert set(producers.__all__) == {
        "AsyncClient",
        "AsyncJob",
        "ChatCompletion",
        "ChatRequest",
        "Client",
        "Event",
        "InvalidRequest",
        "Job",
        "JobCancelled",
        "JobFailed",
        "JobNotFound",
        "JobOptions",
        "JobTimeout",
        "MoonqError",
        "SubmitItem",
        "TenantBudgetExceeded",
        "TenantModelNotAllowed",
    }
    # Each export is defined by the SDK or by the core it shares with the worker (moonq/), nowhere else.
    for name in producers.__all__:
        assert getattr(producers, name).__module__.startswith(("producers.", "moonq.")), name


def test_a_request_over_the_apis_body_limit_is_refused_before_enqueueing() -> None:
    from moonq.request import MAX_REQUEST_BYTES, validate_request

    huge = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "x" * MAX_REQUEST_BYTES}]}
    with pytest.raises(InvalidRequest, match=r"request: must be at most 100 MB as JSON \(the API.s limit\); got 104,"):
        validate_request(huge).to_payload()
