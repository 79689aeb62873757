"""End to end, one test per API feature: producer → Redis → Celery worker → simulator → events → result."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from moonq.wire import Event
from producers import Client, JobFailed, JobNotFound
from tests.helpers import API_KEY

USER = {"role": "user", "content": "Write two sentences about the Moon."}
PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def deltas(events: list[Event], key: str, index: int = 0) -> str:
    return "".join(e.delta.get(key) or "" for e in events if e.type == "delta" and e.index == index and e.delta)


def message(job: Any, index: int = 0) -> Any:
    return job.result(timeout=5).choices[index].message


def test_plain_chat_streams_every_delta_and_assembles_the_result(run: Any) -> None:
    job = run({"model": "moonshot-v1-8k", "messages": [USER]})
    events: list[Event] = job.collected
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == "delta" and events[0].delta == {"role": "assistant", "content": ""}
    assert events[-1].type == "completed"
    result = job.result(timeout=5)
    assert result.object == "chat.completion" and result.model == "moonshot-v1-8k" and result.id.startswith("cmpl-")
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].message.content == deltas(events, "content") != ""
    assert result.usage is not None and result.usage.completion_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert events[-1].result == result.model_dump(exclude_unset=True)
    assert job.status() == "succeeded"


def test_the_callers_stream_flag_does_not_change_the_job(run: Any) -> None:
    a = run({"model": "moonshot-v1-8k", "messages": [USER], "stream": False})
    b = run({"model": "moonshot-v1-8k", "messages": [USER], "stream": True})
    assert message(a).content == message(b).content


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": PNG}},
        {"type": "image_url", "image_url": "ms://file-img-123"},
        {"type": "video_url", "video_url": {"url": "ms://file-video-9"}},
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAAIGZ0eXBpc29t"}},
    ],
    ids=["image-base64", "image-ms-bare", "video-ms", "video-base64"],
)
def test_multimodal_content(run: Any, part: dict[str, Any]) -> None:
    job = run(
        {
            "model": "kimi-k2.5",
            "thinking": {"type": "disabled"},
            "temperature": 0.6,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}],
        }
    )
    assert job.status() == "succeeded" and message(job).content


def test_upstream_rejection_fails_the_job_with_the_upstreams_error(run: Any) -> None:
    job = run(
        {
            "model": "moonshot-v1-8k",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}],
        }
    )
    assert job.collected[-1].type == "failed"
    with pytest.raises(JobFailed) as info:
        job.result(timeout=5)
    assert info.value.error["status"] == 400 and info.value.error["type"] == "invalid_request_error"


def test_unknown_model_is_a_404_failure(run: Any) -> None:
    job = run({"model": "kimi-k9-does-not-exist", "messages": [USER]})
    error = job.collected[-1].error
    assert (error.status, error.type) == (404, "resource_not_found_error")
    assert "kimi-k9-does-not-exist" in error.message


def test_partial_mode_continues_without_repeating_the_prefix(run: Any) -> None:
    prefix = "The Moon is"
    job = run(
        {"model": "moonshot-v1-8k", "messages": [USER, {"role": "assistant", "content": prefix, "partial": True}]}
    )
    content = message(job).content
    assert content and not content.startswith(prefix)


def test_tool_use_round_trip(run: Any) -> None:
    ask = {"role": "user", "content": "Weather in Beijing?"}
    base = {"model": "kimi-k2.5", "thinking": {"type": "disabled"}, "temperature": 0.6, "tools": [WEATHER]}
    first = run({**base, "messages": [ask]})
    result = first.result(timeout=5)
    assert result.choices[0].finish_reason == "tool_calls"
    (call,) = result.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id
    assert "city" in json.loads(call.function.arguments)
    fragments = [e for e in first.collected if e.type == "delta" and e.delta and "tool_calls" in e.delta]
    assert len(fragments) >= 2  # streamed in pieces, joined by the worker
    assistant = result.choices[0].message.model_dump(exclude_none=True)
    second = run(
        {**base, "messages": [ask, assistant, {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]}
    )
    assert second.result(timeout=5).choices[0].finish_reason == "stop" and message(second).content


def test_thinking_streams_reasoning_before_content(run: Any) -> None:
    job = run({"model": "kimi-k2-thinking", "messages": [USER], "max_completion_tokens": 4096})
    kinds = [
        k
        for e in job.collected
        if e.type == "delta" and e.delta
        for k in ("reasoning_content", "content")
        if e.delta.get(k)
    ]
    assert kinds and kinds[0] == "reasoning_content" and "content" in kinds
    assert kinds.index("content") > max(i for i, k in enumerate(kinds) if k == "reasoning_content")
    msg = message(job)
    assert msg.reasoning_content == deltas(job.collected, "reasoning_content") and msg.content


def test_json_mode_answers_json(run: Any) -> None:
    job = run({"model": "moonshot-v1-8k", "messages": [USER], "response_format": {"type": "json_object"}})
    assert isinstance(json.loads(message(job).content), dict)


def test_json_schema_mode(run: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    job = run(
        {
            "model": "kimi-k2.6",
            "thinking": {"type": "disabled"},
            "temperature": 0.6,
            "messages": [USER],
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        }
    )
    data = json.loads(message(job).content)
    assert isinstance(data["name"], str) and isinstance(data["age"], int)


def test_stop_word_cuts_the_output(run: Any) -> None:
    request = {"model": "moonshot-v1-8k", "messages": [USER]}
    full = message(run(request)).content
    words = full.split()
    word = words[len(words) // 2]
    cut = message(run({**request, "stop": [word]}))
    job_result = cut.content
    assert job_result == full[: full.index(word)]


def test_max_completion_tokens_ends_with_length(run: Any) -> None:
    job = run({"model": "moonshot-v1-8k", "messages": [USER], "max_completion_tokens": 3})
    result = job.result(timeout=5)
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 3


def test_prompt_cache_key_reports_cached_tokens(run: Any) -> None:
    request = {
        "model": "kimi-k2.6",
        "thinking": {"type": "disabled"},
        "temperature": 0.6,
        "prompt_cache_key": "session-cache-test",
        "safety_identifier": "user-7f3a",
        "messages": [{"role": "system", "content": "You are Kimi. " * 40}, USER],
    }
    run(request)
    usage = run(request).result(timeout=5).usage
    assert usage.cached_tokens and 0 < usage.cached_tokens <= usage.prompt_tokens


def test_several_choices(run: Any) -> None:
    result = run({"model": "moonshot-v1-8k", "messages": [USER], "n": 2, "temperature": 0.7}).result(timeout=5)
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.message.content for c in result.choices)


def test_late_subscriber_replays_a_finished_job(run: Any, client: Client) -> None:
    job = run({"model": "moonshot-v1-8k", "messages": [USER]})
    late = list(client.job(job.id).events())
    assert late == job.collected
    assert list(client.job(job.id).events(after_seq=3)) == job.collected[3:]


def test_unknown_job(client: Client) -> None:
    with pytest.raises(JobNotFound):
        client.job("no-such-job").status()


def all_values(r: redis.Redis, key: bytes) -> Any:
    kind = r.type(key)
    if kind == b"string":
        return r.get(key)
    if kind == b"hash":
        return r.hgetall(key)
    if kind == b"list":
        return r.lrange(key, 0, -1)
    if kind == b"stream":
        return r.xrange(key)
    if kind == b"set":
        return r.smembers(key)
    return r.zrange(key, 0, -1)


def test_the_api_key_never_reaches_redis(run: Any, r: redis.Redis) -> None:
    run({"model": "kimi-k2.5", "messages": [USER], "thinking": {"type": "disabled"}, "temperature": 0.6})
    run({"model": "kimi-k9-does-not-exist", "messages": [USER]})
    keys = list(r.scan_iter(count=1000))
    assert any(k.startswith(b"moonq:job:") for k in keys)
    for key in keys:
        assert API_KEY.encode() not in repr(all_values(r, key)).encode(), key
