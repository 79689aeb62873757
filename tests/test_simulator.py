"""The simulator over real HTTP: wire format, generation rules and Moonshot-style errors."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import simulator
from simulator import SimConfig, SimServer
from simulator.tokens import count, pieces

KEY = {"Authorization": "Bearer sk-test"}
USER = [{"role": "user", "content": "Tell me about rivers."}]
SYSTEM_USER = [{"role": "system", "content": "You are Kimi, a helpful assistant."}, *USER]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def sim_server() -> Iterator[SimServer]:
    with SimServer(SimConfig(seed=0), port=0) as server:
        yield server


@pytest.fixture(scope="module")
def api(sim_server: SimServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim_server.base_url, headers=KEY, timeout=10) as c:
        yield c


def chat(api: httpx.Client, **body: Any) -> httpx.Response:
    body.setdefault("model", "moonshot-v1-8k")
    body.setdefault("messages", USER)
    return api.post("/chat/completions", json=body)


def ok(api: httpx.Client, **body: Any) -> dict[str, Any]:
    response = chat(api, **body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def events(response: httpx.Response) -> list[Any]:
    """Parses an SSE body, asserting the framing byte for byte on the way."""
    raw = response.content.decode()
    assert raw.endswith("data: [DONE]\n\n")
    frames = raw.split("\n\n")
    assert frames[-1] == ""
    out: list[Any] = []
    for frame in frames[:-2]:
        assert frame.startswith("data: {") and "\n" not in frame
        data = frame.removeprefix("data: ")
        assert data == json.dumps(json.loads(data), ensure_ascii=False, separators=(",", ":"))  # compact JSON
        out.append(json.loads(data))
    return out


def deltas(chunks: list[Any], key: str) -> list[str]:
    return [c["choices"][0]["delta"][key] for c in chunks if c["choices"] and key in c["choices"][0]["delta"]]


def test_public_interface() -> None:
    assert (
        simulator.__all__
        == sorted(simulator.__all__)
        == ["SimConfig", "SimServer", "create_app", "main", "max_in_window"]
    )


def test_plain_completion(api: httpx.Client) -> None:
    response = chat(api)
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["msh-request-id"])
    body = response.json()
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", body["id"])
    assert body["object"] == "chat.completion" and body["model"] == "moonshot-v1-8k"
    assert abs(body["created"] - time.time()) < 60
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant" and "reasoning_content" not in choice["message"]
    content = choice["message"]["content"]
    assert 15 <= count(content) <= 60
    # moonshot-v1 has no automatic cache, so no cached_tokens of either spelling.
    usage = body["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert usage["completion_tokens"] == count(content)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stream_format(api: httpx.Client) -> None:
    response = chat(api, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert "msh-request-id" in response.headers
    chunks = events(response)
    first, *middle, last = chunks
    assert {c["id"] for c in chunks} == {first["id"]} and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert all(c["model"] == "moonshot-v1-8k" and isinstance(c["created"], int) for c in chunks)
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    assert all(
        set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["finish_reason"] is None for c in middle
    )
    # Usage only inside the last choice, with no stream_options: no top-level usage key anywhere.
    assert all("usage" not in c for c in chunks)
    final = last["choices"][0]
    assert final["delta"] == {} and final["finish_reason"] == "stop"
    plain = ok(api)
    assert "".join(deltas(middle, "content")) == plain["choices"][0]["message"]["content"]
    assert final["usage"] == plain["usage"]


def test_stream_include_usage(api: httpx.Client) -> None:
    chunks = events(chat(api, stream=True, stream_options={"include_usage": True}))
    *ordinary, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["object"] == "chat.completion.chunk"
    assert all(c["usage"] is None for c in ordinary)
    assert ordinary[-1]["choices"][0]["usage"] == usage_chunk["usage"]


def test_thinking_streams_reasoning_before_content(api: httpx.Client) -> None:
    chunks = events(chat(api, model="kimi-k2-thinking", stream=True))
    kinds = [k for c in chunks[1:-1] for k in c["choices"][0]["delta"]]
    assert kinds[0] == "reasoning_content" and "content" in kinds
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning_content")  # no reasoning after content
    message = ok(api, model="kimi-k2-thinking")["choices"][0]["message"]
    assert message["reasoning_content"] == "".join(deltas(chunks, "reasoning_content"))
    assert message["content"] == "".join(deltas(chunks[1:], "content"))
    off = ok(api, model="kimi-k2.6", thinking={"type": "disabled"})["choices"][0]["message"]
    assert "reasoning_content" not in off


def test_tool_call_fragments_reassemble(api: httpx.Client) -> None:
    chunks = events(chat(api, model="kimi-k2-turbo-preview", tools=[WEATHER], stream=True))
    fragments = [f for c in chunks for f in c["choices"][0]["delta"].get("tool_calls", [])]
    head, *rest = fragments
    function = {"name": "get_weather", "arguments": ""}
    assert head == {"index": 0, "id": "get_weather:0", "type": "function", "function": function}
    assert len(rest) >= 2 and all(set(f) == {"index", "function"} and set(f["function"]) == {"arguments"} for f in rest)
    arguments = json.loads("".join(f["function"]["arguments"] for f in rest))
    assert isinstance(arguments["city"], str) and arguments["city"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    body = ok(api, model="kimi-k2-turbo-preview", tools=[WEATHER])
    message = body["choices"][0]["message"]
    assert message["content"] == "" and body["choices"][0]["finish_reason"] == "tool_calls"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == arguments
    # With the tool result appended, the model answers in text.
    history = [*USER, message, {"role": "tool", "tool_call_id": "get_weather:0", "content": '{"temp": 21}'}]
    follow = ok(api, model="kimi-k2-turbo-preview", tools=[WEATHER], messages=history)
    assert follow["choices"][0]["finish_reason"] == "stop" and follow["choices"][0]["message"]["content"]


def test_thinking_tool_call_and_tool_choice(api: httpx.Client) -> None:
    clock = _tool("get_time", {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]})
    chunks = events(chat(api, model="kimi-k2.6", tools=[WEATHER, clock], stream=True))
    kinds = [k for c in chunks[1:-1] for k in c["choices"][0]["delta"]]
    assert kinds[0] == "reasoning_content" and set(kinds) == {"reasoning_content", "tool_calls"}
    # A named tool_choice (thinking off) calls that tool; "none" answers in text.
    named = {"type": "function", "function": {"name": "get_time"}}
    request = {"model": "kimi-k2-turbo-preview", "tools": [WEATHER, clock]}
    [call] = ok(api, **request, tool_choice=named)["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time" and "zone" in json.loads(call["function"]["arguments"])
    assert "tool_calls" not in ok(api, **request, tool_choice="none")["choices"][0]["message"]


def test_web_search_builtin(api: httpx.Client) -> None:
    tools = [{"type": "builtin_function", "function": {"name": "$web_search"}}]
    body = ok(api, model="kimi-k2-turbo-preview", tools=tools)
    [call] = body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "$web_search" and call["id"] == "$web_search:0"
    arguments = json.loads(call["function"]["arguments"])
    assert arguments["search_result"]["search_id"] and arguments["usage"]["total_tokens"] > 0
    answer = {"role": "assistant", "content": "", "tool_calls": [call]}
    result = {
        "role": "tool",
        "tool_call_id": call["id"],
        "name": "$web_search",
        "content": call["function"]["arguments"],
    }
    follow = ok(api, model="kimi-k2-turbo-preview", tools=tools, messages=[*USER, answer, result])
    assert follow["choices"][0]["finish_reason"] == "stop"
    # Search results are billed as input tokens.
    assert follow["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"] + arguments["usage"]["total_tokens"]


def test_partial_mode_continues_without_repeating(api: httpx.Client) -> None:
    prefix = "Once upon a time"
    messages = [*USER, {"role": "assistant", "content": prefix, "partial": True}]
    content = ok(api, messages=messages)["choices"][0]["message"]["content"]
    assert not content.startswith(prefix) and prefix not in content
    assert re.match(r" [a-z]", content)  # reads on mid-sentence


def test_json_object_mode(api: httpx.Client) -> None:
    content = ok(api, response_format={"type": "json_object"})["choices"][0]["message"]["content"]
    assert isinstance(json.loads(content), dict)


def test_json_schema_mode(api: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
            "score": {"type": "number"},
            "done": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "mood": {"enum": ["happy", "sad"]},
        },
        "required": ["title", "year", "score", "done", "tags", "mood"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "film", "strict": True, "schema": schema}}
    value = json.loads(ok(api, response_format=fmt)["choices"][0]["message"]["content"])
    assert set(value) == set(schema["required"])
    assert isinstance(value["title"], str) and isinstance(value["done"], bool)
    assert isinstance(value["year"], int) and 1900 <= value["year"] <= 2030
    assert isinstance(value["score"], int | float) and value["mood"] in ("happy", "sad")
    assert value["tags"] and all(isinstance(t, str) for t in value["tags"])


def test_stop_cuts_before_stop_string(api: httpx.Client) -> None:
    full = ok(api)["choices"][0]["message"]["content"]
    words = full.split()
    stop = " " + words[len(words) // 2]
    body = ok(api, stop=[stop, "never-appears"])
    assert body["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    streamed = events(chat(api, stop=stop, stream=True))
    assert "".join(deltas(streamed[1:], "content")) == full[: full.index(stop)]


def test_length_cut(api: httpx.Client) -> None:
    full = ok(api)["choices"][0]["message"]["content"]
    body = ok(api, max_completion_tokens=5)
    content = body["choices"][0]["message"]["content"]
    assert full.startswith(content) and count(content) == 5
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 5
    # The deprecated max_tokens still works.
    assert ok(api, max_tokens=3)["choices"][0]["finish_reason"] == "length"


def test_budget_spent_on_reasoning(api: httpx.Client) -> None:
    body = ok(api, model="kimi-k2-thinking", max_completion_tokens=4)
    [choice] = body["choices"]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == ""
    assert count(choice["message"]["reasoning_content"]) == 4 and body["usage"]["completion_tokens"] == 4


def test_n_choices(api: httpx.Client) -> None:
    body = ok(api, n=2)
    first, second = body["choices"]
    assert (first["index"], second["index"]) == (0, 1)
    assert first["message"]["content"] != second["message"]["content"]
    assert body["usage"]["completion_tokens"] == sum(count(c["message"]["content"]) for c in body["choices"])
    chunks = events(chat(api, n=2, stream=True))
    finals = {c["choices"][0]["index"]: c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]}
    assert set(finals) == {0, 1}
    assert [finals[i]["usage"]["completion_tokens"] for i in (0, 1)] == [
        count(first["message"]["content"]),
        count(second["message"]["content"]),
    ]


def test_context_cache(api: httpx.Client) -> None:
    system_only = api.post("/tokenizers/estimate-token-count", json={"model": "kimi-k2.6", "messages": SYSTEM_USER[:1]})
    expected = system_only.json()["data"]["total_tokens"]
    request = {"model": "kimi-k2.6", "messages": SYSTEM_USER, "prompt_cache_key": "cache-test"}
    assert ok(api, **request)["usage"]["cached_tokens"] == 0
    usage = ok(api, **request)["usage"]
    assert usage["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"] == expected
    assert usage["prompt_tokens"] > expected  # prompt_tokens includes the cached part
    # Another key is another cache; k2.5 reports the nested spelling only.
    assert ok(api, **{**request, "prompt_cache_key": "other"})["usage"]["cached_tokens"] == 0
    k25 = {**request, "model": "kimi-k2.5"}
    ok(api, **k25)
    usage = ok(api, **k25)["usage"]
    assert "cached_tokens" not in usage and usage["prompt_tokens_details"]["cached_tokens"] == expected


@pytest.mark.parametrize(
    ("authorization", "error_type", "message"),
    [
        (None, "invalid_authentication_error", "Invalid Authentication"),
        ("Basic dXNlcjpwYXNz", "invalid_authentication_error", "Invalid Authentication"),
        ("Bearer not-a-key", "incorrect_api_key_error", "Incorrect API key provided"),
    ],
)
def test_auth_errors(sim_server: SimServer, authorization: str | None, error_type: str, message: str) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.post(f"{sim_server.base_url}/chat/completions", json={"model": "kimi-k2.5"}, headers=headers)
    assert response.status_code == 401
    assert (
        response.content
        == json.dumps({"error": {"message": message, "type": error_type}}, separators=(",", ":")).encode()
    )
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert "msh-request-id" in response.headers and "retry-after" not in response.headers


def _too_many_tools() -> list[Any]:
    return [{"type": "function", "function": {"name": f"tool_{i}"}} for i in range(129)]


def _tool(name: str, parameters: Any = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


_CALL = {"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
_IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
_TOOL_TURN = [*USER, {"role": "assistant", "content": "", "tool_calls": [_CALL]}]
_INVALID = "Invalid request: "
VALIDATION_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("no model", {"model": None}, _INVALID + "model is required"),
    ("no messages", {"messages": None}, _INVALID + "messages must be a non-empty list"),
    ("empty messages", {"messages": []}, _INVALID + "messages must be a non-empty list"),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, _INVALID + "the message at position 0 has an"),
    ("empty user", {"messages": [{"role": "user", "content": ""}]}, _INVALID + "the message at position 0 with role"),
    ("empty system", {"messages": [{"role": "system", "content": ""}, *USER]}, _INVALID + "the message at position 0"),
    (
        "partial not last",
        {"messages": [{"role": "assistant", "content": "x", "partial": True}, *USER]},
        _INVALID + "partial is only allowed on the last message",
    ),
    ("partial on user", {"messages": [{"role": "user", "content": "x", "partial": True}]}, _INVALID + "partial"),
    (
        "partial with json",
        {
            "messages": [*USER, {"role": "assistant", "content": "{", "partial": True}],
            "response_format": {"type": "json_object"},
        },
        _INVALID + "partial mode cannot be used with response_format json_object",
    ),
    ("too many stops", {"stop": list("abcdef")}, _INVALID + "stop accepts at most 5 strings"),
    ("long stop", {"stop": ["x" * 33]}, _INVALID + "each stop string must be at most 32 bytes"),
    ("too many tools", {"tools": _too_many_tools()}, _INVALID + "too many tools: 129"),
    ("bad tool name", {"tools": [_tool("1abc")]}, _INVALID + "tool name '1abc' is invalid"),
    ("short tool name", {"tools": [_tool("ab")]}, _INVALID + "tool name 'ab' is invalid"),
    (
        "parameters not object",
        {"tools": [_tool("get_list", {"type": "array"})]},
        _INVALID + 'tools.function.parameters.type is required and must be "object"',
    ),
    (
        "type beside anyOf",
        {"tools": [_tool("get_list", {"type": "object", "anyOf": [{"type": "object"}]})]},
        _INVALID + "tools.function.parameters is not a valid moonshot flavored json schema, details: <At path 'root'",
    ),
    ("temperature", {"temperature": 1.5}, _INVALID + "temperature must be in [0, 1], got 1.5"),
    ("top_p", {"top_p": -0.1}, _INVALID + "top_p must be in [0, 1]"),
    ("n", {"n": 6}, _INVALID + "n must be an integer between 1 and 5"),
    ("penalty", {"presence_penalty": 3}, _INVALID + "presence_penalty must be in [-2, 2]"),
    ("n at temperature 0", {"n": 2, "temperature": 0}, _INVALID + "n > 1 is not supported when temperature"),
    ("response format", {"response_format": {"type": "xml"}}, _INVALID + "response_format.type must be"),
    (
        "image without url",
        {"model": "kimi-k2.5", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        _INVALID + "image_url.url is required",
    ),
    (
        "remote image",
        {
            "model": "kimi-k3",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "https://x/y.png"}]}],
        },
        _INVALID + "image_url.url must be a base64 data URL or ms://<file_id>",
    ),
    (
        "image on text model",
        {"messages": [{"role": "user", "content": [_IMAGE, {"type": "text", "text": "what is it?"}]}]},
        _INVALID + "the model moonshot-v1-8k does not support image input",
    ),
    (
        "unknown tool_call_id",
        {"messages": [*USER, {"role": "tool", "tool_call_id": "nope:0", "content": "1"}]},
        _INVALID + "tool_call_id not found: nope:0",
    ),
    (
        "unanswered tool call",
        {"messages": [*_TOOL_TURN, *USER]},
        "an assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'.",
    ),
    (
        "duplicate tool call id",
        {"messages": [*_TOOL_TURN, {"role": "tool", "tool_call_id": "get_weather:0", "content": "1"}, *_TOOL_TURN[1:]]},
        _INVALID + "tool call id get_weather:0 is duplicated",
    ),
    (
        "reasoning missing",
        {
            "model": "kimi-k2.5",
            "messages": [*_TOOL_TURN, {"role": "tool", "tool_call_id": "get_weather:0", "content": "1"}],
        },
        "thinking is enabled but reasoning_content is missing in assistant tool call message at index 1",
    ),
    (
        "k2.7 thinking off",
        {"model": "kimi-k2.7-code", "thinking": {"type": "disabled"}},
        "invalid thinking: only type=enabled is allowed for this model",
    ),
    (
        "k2.5 temperature",
        {"model": "kimi-k2.5", "temperature": 0.3},
        "invalid temperature: only 1 is allowed for this model",
    ),
    (
        "k2.5 temperature no thinking",
        {"model": "kimi-k2.6", "temperature": 1.0, "thinking": {"type": "disabled"}},
        "invalid temperature: only 0.6 is allowed for this model",
    ),
    ("k2.6 top_p", {"model": "kimi-k2.6", "top_p": 0.5}, "invalid top_p: only 0.95 is allowed for this model"),
    (
        "forced tool while thinking",
        {
            "model": "kimi-k2.6",
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        },
        "tool_choice 'specified' is incompatible with thinking enabled",
    ),
    ("k3 effort", {"model": "kimi-k3", "reasoning_effort": "extreme"}, _INVALID + "reasoning_effort must be one of"),
    ("stream not bool", {"stream": "yes"}, _INVALID + "stream must be a boolean"),
    ("token limit", {"max_completion_tokens": 8190}, _INVALID + "Your request exceeded model token limit : 8192"),
]


@pytest.mark.parametrize(
    ("overrides", "message"), [c[1:] for c in VALIDATION_CASES], ids=[c[0] for c in VALIDATION_CASES]
)
def test_validation_errors(api: httpx.Client, overrides: dict[str, Any], message: str) -> None:
    body = {"model": "moonshot-v1-8k", "messages": USER, **overrides}
    response = api.post("/chat/completions", json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type"} and error["type"] == "invalid_request_error"
    assert error["message"].startswith(message), error["message"]


@pytest.mark.parametrize("content", [b"[1, 2]", b"{not json"])
def test_body_must_be_json_object(api: httpx.Client, content: bytes) -> None:
    response = api.post("/chat/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "Invalid request: the request body must be a JSON object"


ODD_BODIES: list[dict[str, Any]] = [
    {"messages": [{"role": ["user"], "content": "hi"}]},
    {"messages": [{"role": "user", "content": [{"type": {"x": 1}}]}]},
    {"tools": [{"type": "builtin_function", "function": {"name": ["$web_search"]}}]},
    {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": {}}}},
    {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": {"a": 1}, "minLength": 10**30}}}},
    {
        "tools": [
            _tool("get_x", {"type": "object", "properties": {"n": {"type": "integer", "minimum": 9, "maximum": 1}}})
        ]
    },
]


@pytest.mark.parametrize("overrides", ODD_BODIES)
def test_odd_input_is_answered_not_crashed(api: httpx.Client, overrides: dict[str, Any]) -> None:
    response = chat(api, **overrides)
    assert response.status_code in (200, 400) and response.headers["content-type"].startswith("application/json")


def test_unknown_fields_are_ignored(api: httpx.Client) -> None:
    assert chat(api, store=True, metadata={"x": 1}, safety_identifier="u-1").status_code == 200


def test_unknown_model(api: httpx.Client) -> None:
    response = chat(api, model="gpt-4o")
    assert response.status_code == 404
    assert response.json() == {
        "error": {"message": "Not found the model gpt-4o or Permission denied", "type": "resource_not_found_error"}
    }


def test_unknown_route_answers_like_the_gateway(api: httpx.Client) -> None:
    response = api.get("/chat/completions")
    assert response.status_code == 404 and "msh-request-id" in response.headers
    assert response.json()["error"] == "url.not_found"


def test_models_list(api: httpx.Client) -> None:
    data = api.get("/models").json()["data"]
    ids = {m["id"] for m in data}
    assert {"kimi-k3", "kimi-k2.7-code-highspeed", "kimi-k2.5", "moonshot-v1-auto", "kimi-latest"} <= ids
    assert len(ids) == 18 and all(m["object"] == "model" and m["owned_by"] == "moonshot" for m in data)


def test_token_estimate_equals_prompt_tokens(api: httpx.Client) -> None:
    messages = [
        *SYSTEM_USER,
        {"role": "assistant", "content": "Rivers flow."},
        {"role": "user", "content": "你好世界"},
    ]
    estimate = api.post("/tokenizers/estimate-token-count", json={"model": "kimi-k2.5", "messages": messages})
    assert estimate.status_code == 200
    assert (
        estimate.json()["data"]["total_tokens"]
        == ok(api, model="kimi-k2.5", messages=messages)["usage"]["prompt_tokens"]
    )


def test_determinism(api: httpx.Client) -> None:
    first = ok(api, n=3)["choices"]
    assert [c["message"] for c in ok(api, n=3)["choices"]] == [c["message"] for c in first]
    with SimServer(SimConfig(seed=1)) as other, httpx.Client(base_url=other.base_url, headers=KEY) as c:
        assert ok(c, n=3)["choices"][0]["message"] != first[0]["message"]


def test_pieces_round_trip() -> None:
    text = "Hello, world!  你好 x_1 "
    assert "".join(pieces(text)) == text and len(pieces(text)) == count(text) == 7


def test_concurrent_streams_are_paced_without_blocking() -> None:
    cfg = SimConfig(first_token_latency_s=0.3, chunk_interval_s=0.01, tokens_per_chunk=8)

    async def run(base_url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=base_url, headers=KEY, timeout=10) as c:
            body = {"model": "moonshot-v1-8k", "messages": USER, "stream": True}
            responses = await asyncio.gather(*(c.post("/chat/completions", json=body) for _ in range(100)))
            return [r.status_code for r in responses]

    with SimServer(cfg) as server:
        started = time.monotonic()
        assert asyncio.run(run(server.base_url)) == [200] * 100
        elapsed = time.monotonic() - started
    # 100 streams of ~0.4 s each: concurrent, so far below 100 x 0.4 s.
    assert 0.3 <= elapsed < 4


def test_cli_serves_until_sigterm() -> None:
    command = [sys.executable, "-m", "simulator", "--port", "0", "--latency-ms", "0", "--chunk-interval-ms", "0"]
    with subprocess.Popen(command, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        match = re.fullmatch(r"moonq simulator listening on (http://127\.0\.0\.1:\d+/v1)", line)
        assert match, line
        assert httpx.get(f"{match[1]}/models", headers=KEY).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
