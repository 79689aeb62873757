"""The API exactly as Moonshot speaks it: the nine points of issue 14, each with a test that failed before.

1. ``$web_search``: its assistant message goes back unchanged (typed ``builtin_function``), and the
   ``builtin_tools="auto"`` option lets a node run the round trip itself (SDK, CLI, gateway header).
2. ``max_tokens`` is sent as written, and the TPM reservation counts either spelling.
3. Tool calls assemble from upstreams that repeat ``id`` and ``name`` in later fragments.
4. Empty content the API refuses is refused before enqueue; ``reasoning_content: ""`` is not.
5. Documented per-model rules are checked at submit; unknown models stay permissive.
6. Booleans must be booleans: nothing is coerced into the body.
7. The gateway's streamed usage with n > 1 is counted once.
8. Tool names are matched whole: a trailing newline is not a name.
9. The simulator is as strict as the API on all of the above.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from console.cli import main
from gateway.app import GatewaySettings
from moonq.request import validate_request
from producers import Client, InvalidRequest
from simulator import SimServer
from simulator.server import serve_in_thread
from tests.helpers import make_settings, serve_gateway
from worker.assemble import StreamAssembler
from worker.estimate import prompt_tokens, reservation
from worker.loop import Runtime
from worker.settings import Settings
from worker.upstream import upstream_payload

USER: list[dict[str, Any]] = [{"role": "user", "content": "What happened in the news today?"}]
WEB_SEARCH: dict[str, Any] = {"type": "builtin_function", "function": {"name": "$web_search"}}
SEARCH: dict[str, Any] = {"model": "kimi-k2-turbo-preview", "messages": USER, "tools": [WEB_SEARCH]}
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
TOKEN = "gw-fidelity-token"


def refused(request: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_request(request)
    assert any(f == field and rule in r for f, r in info.value.errors), info.value.errors


@pytest.fixture(scope="module")
def node(redis_url: str, sim: SimServer) -> Iterator[tuple[Runtime, Settings]]:
    settings = make_settings(redis_url, prefix=f"fi{uuid.uuid4().hex[:8]}", moonshot_base_url=sim.base_url)
    rt = Runtime(settings).start()
    yield rt, settings
    rt.stop()


@pytest.fixture(scope="module")
def gateway(redis_url: str) -> Iterator[str]:
    with serve_gateway(GatewaySettings(redis_url=redis_url, gateway_tokens=TOKEN)) as url:
        yield url


@pytest.fixture
def sdk(gateway: str, worker: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway}/v1", api_key=TOKEN, max_retries=0) as client:
        yield client


# --- 1. $web_search ------------------------------------------------------------------------------


def test_1_a_web_search_turn_goes_back_unchanged(api_call: Any) -> None:
    body = api_call(SEARCH)
    [call] = body["choices"][0]["message"]["tool_calls"]
    assert call["type"] == "builtin_function" and call["function"]["name"] == "$web_search"
    follow = {
        **SEARCH,
        "messages": [
            *USER,
            body["choices"][0]["message"],
            {
                "role": "tool",
                "tool_call_id": call["id"],
                "name": "$web_search",
                "content": call["function"]["arguments"],
            },
        ],
    }
    assert validate_request(follow).to_payload() == follow  # refused before: tool_calls[].type had to be "function"
    assert api_call(follow)["choices"][0]["finish_reason"] == "stop"


def test_1_builtin_tools_auto_runs_the_round_trip_in_one_job(node: tuple[Runtime, Settings]) -> None:
    rt, settings = node
    with Client(settings=settings) as client:
        job = client.submit(SEARCH, builtin_tools="auto")
        assert (
            job.record()["builtin_tools"] == "auto"
            and "builtin_tools" not in json.loads(job.record()["envelope"])["request"]
        )
        assert rt.run(json.loads(job.record()["envelope"])) == "succeeded"
        events = list(job.events())
        result = job.result(timeout=5)
    assert result.choices[0].finish_reason == "stop" and result.choices[0].message.content
    rounds = [e for e in events if e.type == "retry"]
    assert [(e.reason, e.resume, e.attempt) for e in rounds] == [("tool_round", False, 2)]
    attempts = result.model_dump()["moonq"]["attempts"]
    assert [a["outcome"] for a in attempts] == ["tool_round", "completed"]
    assert result.usage is not None and result.usage.total_tokens == sum(a["usage"]["total_tokens"] for a in attempts)
    # Without the option the caller gets the tool call, as before.
    with Client(settings=settings) as client:
        plain = client.submit(SEARCH)
        rt.run(json.loads(plain.record()["envelope"]))
        assert plain.result(timeout=5).choices[0].finish_reason == "tool_calls"


def test_1_builtin_tools_is_checked_beside_the_request(node: tuple[Runtime, Settings]) -> None:
    _, settings = node
    with Client(settings=settings) as client:
        with pytest.raises(InvalidRequest, match="builtin_tools: must be one of auto"):
            client.submit(SEARCH, builtin_tools="yes")
        with pytest.raises(InvalidRequest, match="builtin_tools: needs n = 1"):
            client.submit({**SEARCH, "n": 2}, builtin_tools="auto")


def test_1_the_cli_flag_and_the_gateway_header(
    sdk: Any, client: Client, fresh_prefix: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = tmp_path / "search.json"
    request.write_text(json.dumps(SEARCH))
    monkeypatch.setenv("MOONQ_PREFIX", fresh_prefix.prefix)
    argv = [
        "--redis-url",
        fresh_prefix.redis_url,
        "submit",
        "--file",
        str(request),
        "--builtin-tools",
        "auto",
        "--no-wait",
    ]
    assert main(argv) == 0
    [key] = redis.Redis.from_url(fresh_prefix.redis_url).keys(f"{fresh_prefix.prefix}:job:*")
    assert redis.Redis.from_url(fresh_prefix.redis_url).hget(key, "builtin_tools") == b"auto"
    assert main([*argv[:-3], "--builtin-tools", "always", "--no-wait"]) == 2
    # Through the gateway the round is invisible: the caller's stream is the final answer only.
    stream = sdk.chat.completions.with_raw_response.create(
        **SEARCH, stream=True, extra_headers={"X-Moonq-Builtin-Tools": "auto"}
    )
    job = client.job(stream.headers["X-Moonq-Job-Id"])
    chunks = list(stream.parse())
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == job.result(timeout=5).choices[0].message.content and text
    with pytest.raises(openai.BadRequestError, match="X-Moonq-Builtin-Tools"):
        sdk.chat.completions.create(**SEARCH, extra_headers={"X-Moonq-Builtin-Tools": "manual"})


# --- 2. max_tokens as written --------------------------------------------------------------------


def test_2_max_tokens_is_sent_as_written_and_reserved_as_such() -> None:
    request = {"model": "moonshot-v1-8k", "messages": USER, "max_tokens": 77}
    payload = validate_request(request).to_payload()
    sent = upstream_payload(payload)
    assert sent["max_tokens"] == 77 and "max_completion_tokens" not in sent  # renamed before
    assert reservation(payload) == prompt_tokens(payload) + 77
    newer = {"model": "moonshot-v1-8k", "messages": USER, "max_completion_tokens": 77}
    assert reservation(validate_request(newer).to_payload()) == reservation(payload)
    refused({**request, "max_completion_tokens": 5}, "max_tokens", "set only one")


# --- 3. tool calls from upstreams that repeat id and name -------------------------------------------


def test_3_repeated_ids_and_names_assemble_into_one_call() -> None:
    def chunk(*fragments: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"choices": [{"index": 0, "delta": {"tool_calls": list(fragments)}, "finish_reason": finish}]}

    head = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    again = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"ci'}}
    empty_id = {"index": 0, "id": "", "function": {"name": "get_weather", "arguments": 'ty": "Paris"}'}}
    split = {"index": 1, "id": "call_2", "function": {"name": "get_", "arguments": ""}}
    rest = {"index": 1, "function": {"name": "time", "arguments": "{}"}}
    assembler = StreamAssembler()
    for c in (chunk(head), chunk(again), chunk(empty_id), chunk(split), chunk(rest)):
        assembler.feed(c)
    assembler.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    first, second = assembler.finish()["choices"][0]["message"]["tool_calls"]
    assert first == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    assert second["id"] == "call_2" and second["function"] == {"name": "get_time", "arguments": "{}"}


def test_3_through_a_node_from_an_upstream_that_repeats_them(redis_url: str) -> None:
    """An OpenAI-compatible upstream (not the simulator) that repeats every header field in each fragment."""
    head = {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    pieces = ['{"city"', ': "Oslo"}']
    chunks: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks.append({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, **head}]}}]})
    for i, piece in enumerate(pieces):
        fragment = {"index": 0, "id": "" if i else "call_9", "function": {"name": "get_weather", "arguments": piece}}
        chunks.append({"choices": [{"index": 0, "delta": {"tool_calls": [fragment]}}]})
    usage = {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}], "usage": usage})
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"

    async def upstream(request: Request) -> Response:
        return Response(body, media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", upstream, methods=["POST"])])
    with serve_in_thread(app) as url:
        settings = make_settings(redis_url, prefix=f"fu{uuid.uuid4().hex[:8]}", moonshot_base_url=f"{url}/v1")
        rt = Runtime(settings).start()
        try:
            with Client(settings=settings) as client:
                job = client.submit({"model": "other-upstream", "messages": USER, "tools": [WEATHER]})
                assert rt.run(json.loads(job.record()["envelope"])) == "succeeded"
                [call] = job.result(timeout=5).choices[0].message.tool_calls or []
        finally:
            rt.stop()
    assert (call.id, call.function.name, call.function.arguments) == ("call_9", "get_weather", '{"city": "Oslo"}')


# --- 4. empty content -------------------------------------------------------------------------------


def test_4_empty_content_the_api_refuses_is_refused_here() -> None:
    parts = [{"type": "text", "text": ""}, {"type": "text", "text": "hello"}]
    refused(
        {"model": "m", "messages": [{"role": "user", "content": parts}]},
        "messages.0.content.0.text",
        "must not be empty",
    )
    empty_calls = {"role": "assistant", "content": "", "tool_calls": []}
    refused({"model": "m", "messages": [*USER, empty_calls]}, "messages.1.content", "must not be empty")
    # An empty reasoning_content is how clients round-trip an empty reasoning; the API takes it (§9).
    call = {"id": "get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    turn = [*USER, {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": [call]}]
    turn.append({"role": "tool", "tool_call_id": "get_weather:0", "content": "sunny"})
    request = {"model": "kimi-k2-thinking", "messages": turn, "tools": [WEATHER]}
    assert validate_request(request).to_payload() == request


# --- 5. per-model rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "field", "rule"),
    [
        ({"model": "kimi-k2.5", "temperature": 0.3}, "temperature", "accepts only 1 with thinking"),
        ({"model": "kimi-k2.6", "thinking": {"type": "disabled"}, "temperature": 1.0}, "temperature", "only 0.6"),
        ({"model": "kimi-k2.5", "top_p": 0.5}, "top_p", "only 0.95"),
        ({"model": "kimi-k2.6", "n": 2}, "n", "only 1"),
        ({"model": "kimi-k2.5", "presence_penalty": 0.5}, "presence_penalty", "only 0"),
        ({"model": "moonshot-v1-8k", "n": 2, "temperature": 0.0}, "n", "temperature of at least 0.01"),
        ({"model": "kimi-k2.7-code", "thinking": {"type": "disabled"}}, "thinking.type", "only thinks"),
        (
            {"model": "kimi-k2-thinking", "tools": [WEATHER], "tool_choice": "required"},
            "tool_choice",
            "forced tool choice while thinking",
        ),
        (
            {
                "model": "kimi-k2.5",
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            },
            "tool_choice",
            "forced tool choice while thinking",
        ),
    ],
)
def test_5_documented_model_rules_are_checked_before_enqueue(
    request_: dict[str, Any], field: str, rule: str, fresh_prefix: Settings, r: redis.Redis
) -> None:
    refused({"messages": USER, **request_}, field, rule)
    with Client(settings=fresh_prefix) as client, pytest.raises(InvalidRequest):
        client.submit({"messages": USER, **request_})
    assert r.keys(f"{fresh_prefix.prefix}:*") == []  # it never queued


def test_5_allowed_values_and_unknown_models_pass() -> None:
    for request in (
        {"model": "kimi-k2.5", "temperature": 1.0, "top_p": 0.95, "n": 1, "presence_penalty": 0.0},
        {"model": "kimi-k2.6", "thinking": {"type": "disabled"}, "temperature": 0.6},
        {"model": "kimi-k3", "tools": [WEATHER], "tool_choice": "required"},
        {"model": "kimi-k2.5", "thinking": {"type": "disabled"}, "tools": [WEATHER], "tool_choice": "required"},
        {"model": "some-other-upstream-model", "temperature": 0.0, "n": 5, "top_p": 0.2},
        {"model": "kimi-k2.5-20260301", "temperature": 0.2},  # a dated variant is not assumed to share the rules
    ):
        full = {"messages": USER, **request}
        assert validate_request(full).to_payload() == full


# --- 6. booleans ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({"messages": [*USER, {"role": "assistant", "content": "Hi", "partial": "yes"}]}, "messages.1.partial"),
        ({"stream": "false"}, "stream"),
        ({"stream": 0}, "stream"),
        ({"stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
        ({"logprobs": 1}, "logprobs"),
        ({"tools": [{**WEATHER, "function": {**WEATHER["function"], "strict": "yes"}}]}, "tools.0.function.strict"),
    ],
)
def test_6_booleans_are_never_coerced(request_: dict[str, Any], field: str) -> None:
    refused({"model": "m", "messages": USER, **request_}, field, "valid boolean")


def test_6_real_booleans_pass_unchanged() -> None:
    request = {
        "model": "m",
        "messages": [*USER, {"role": "assistant", "content": "Hi", "partial": True}],
        "stream": False,
        "stream_options": {"include_usage": True},
    }
    assert validate_request(request).to_payload() == request


# --- 7. streamed usage with n > 1 ---------------------------------------------------------------------------


def test_7_usage_of_several_choices_is_streamed_once(sdk: Any, client: Client) -> None:
    stream = sdk.chat.completions.with_raw_response.create(model="moonshot-v1-8k", messages=USER, n=2, stream=True)
    job = client.job(stream.headers["X-Moonq-Job-Id"])
    chunks = list(stream.parse())
    per_choice = [c.choices[0].model_extra.get("usage") for c in chunks if c.choices and c.choices[0].model_extra]
    counted = [u for u in per_choice if u]
    total = job.result(timeout=5).usage
    assert total is not None and sum(u["total_tokens"] for u in counted) == total.total_tokens  # was 2x
    assert {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason} == {0, 1}


# --- 8. tool names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["get_weather\n", "ab", "1abc", "get weather", "x" * 65])
def test_8_tool_names_match_whole(name: str) -> None:
    tool = {"type": "function", "function": {"name": name}}
    refused({"model": "m", "messages": USER, "tools": [tool]}, "tools.0.function.name", "does not match")


# --- 9. the simulator is as strict as the API -------------------------------------------------------------------


@pytest.fixture
def api_call(sim: SimServer) -> Iterator[Any]:
    with httpx.Client(base_url=sim.base_url, headers={"Authorization": "Bearer sk-fidelity"}) as http:

        def call(body: dict[str, Any], status: int = 200) -> dict[str, Any]:
            response = http.post("/chat/completions", json=body)
            assert response.status_code == status, response.text
            return dict(response.json())

        yield call


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([*USER, {"role": "assistant", "content": ""}, *USER], "with role 'assistant' must not be empty"),
        (
            [*USER, {"role": "assistant", "content": "", "tool_calls": []}, *USER],
            "with role 'assistant' must not be empty",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "hi"}]}],
            "text content is empty",
        ),
        ([*USER, {"role": "assistant", "content": "Hi", "partial": "yes"}], "partial of the message at position 1"),
    ],
)
def test_9_the_simulator_refuses_what_the_api_refuses(api_call: Any, messages: list[Any], message: str) -> None:
    body = api_call({"model": "moonshot-v1-8k", "messages": messages}, status=400)
    assert body["error"]["type"] == "invalid_request_error" and message in body["error"]["message"]


def test_9_the_simulator_takes_an_empty_reasoning_content(api_call: Any) -> None:
    first = api_call({"model": "kimi-k2-thinking", "messages": USER, "tools": [WEATHER]})
    message = {**first["choices"][0]["message"], "reasoning_content": ""}
    call = message["tool_calls"][0]
    answer = {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}
    api_call({"model": "kimi-k2-thinking", "messages": [*USER, message, answer], "tools": [WEATHER]})
    missing = {k: v for k, v in message.items() if k != "reasoning_content"}
    api_call({"model": "kimi-k2-thinking", "messages": [*USER, missing, answer], "tools": [WEATHER]}, status=400)


@pytest.mark.parametrize(
    ("model", "top", "nested"),
    [
        ("kimi-k2.5", False, True),
        ("kimi-k2.6", True, True),
        ("kimi-k2-turbo-preview", True, False),
        ("moonshot-v1-8k", False, False),
    ],
)
def test_9_cached_tokens_are_spelled_per_model(api_call: Any, model: str, top: bool, nested: bool) -> None:
    extra = {"thinking": {"type": "disabled"}, "temperature": 0.6} if model.startswith("kimi-k2.") else {}
    usage = api_call({"model": model, "messages": USER, **extra})["usage"]
    assert ("cached_tokens" in usage, "prompt_tokens_details" in usage) == (top, nested)
