"""Broken streams resumed with Partial Mode, end to end: one continuous answer, honest usage.

A real node (the embedded runtime) streams from the simulator, whose ``drop``, ``truncate`` and
``stall`` faults break the stream at a chosen frame. For every fault kind and every break point
the subscribers' deltas, read as the ``retry`` events say (``resume: true``: they stand; else they
are superseded), spell exactly the final content, and that content is the answer an unbroken
stream gives. Where Partial Mode cannot apply the answer starts over and the event says why. The
gateway's OpenAI-compatible stream goes on across a break, checked with the official SDK.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from gateway.app import GatewaySettings
from moonq.wire import Event
from producers import Client, Job
from simulator import SimConfig, SimServer
from tests.helpers import make_settings, serve_gateway
from worker.answer import Answer
from worker.assemble import StreamAssembler
from worker.billing import settle, total_usage
from worker.loop import Runtime
from worker.resume import (
    ANSWER_FINISHED,
    BUDGET_SPENT,
    JSON_MODE,
    PREFIX_NOT_TEXT,
    REASONING_UNFINISHED,
    RESUME_OFF,
    SEVERAL_CHOICES,
    STOP_WORD,
    TOOL_CALL,
    Streamed,
    continuation,
    decide,
)
from worker.settings import Settings

USER: list[dict[str, Any]] = [{"role": "user", "content": "Tell me something about rivers."}]
PLAIN: dict[str, Any] = {"model": "moonshot-v1-8k", "messages": USER}
# Short answers in two-token fragments: about 14 frames, so every break point is a handful of jobs.
SHORT = SimConfig(seed=21, tokens_per_chunk=2, answer_tokens=(24, 24), reasoning_tokens=(8, 8))
READ_TIMEOUT_S = 0.3


# --- the decisions, pure -----------------------------------------------------------------------


def streamed(content: str = "", reasoning: str = "", *, tool: bool = False) -> Streamed:
    out = Streamed()
    if reasoning:
        out.add(0, {"reasoning_content": reasoning})
    if content:
        out.add(0, {"content": content})
    if tool:
        out.add(0, {"tool_calls": [{"index": 0, "id": "f:0", "function": {"name": "f", "arguments": ""}}]})
    return out


@pytest.mark.parametrize(
    ("request_", "seen", "finished", "mode", "why"),
    [
        (PLAIN, streamed("Rivers"), False, "restart", RESUME_OFF),
        ({**PLAIN, "n": 2}, streamed("Rivers"), False, "partial", SEVERAL_CHOICES),
        ({**PLAIN, "response_format": {"type": "json_object"}}, streamed('{"a'), False, "partial", JSON_MODE),
        ({**PLAIN, "response_format": {"type": "json_schema"}}, streamed('{"a'), False, "partial", JSON_MODE),
        (PLAIN, streamed("I will call", tool=True), False, "partial", TOOL_CALL),
        (PLAIN, streamed("Rivers."), True, "partial", ANSWER_FINISHED),
        ({**PLAIN, "model": "kimi-k2-thinking"}, streamed("", "Let me think"), False, "partial", REASONING_UNFINISHED),
        ({**PLAIN, "stop": ["END", "\n\n"]}, streamed("Rivers flow EN"), False, "partial", STOP_WORD),
        ({**PLAIN, "stop": "\n\n"}, streamed("Rivers flow\n"), False, "partial", STOP_WORD),
        ({**PLAIN, "max_completion_tokens": 1}, streamed("Rivers"), False, "partial", BUDGET_SPENT),
        ({**PLAIN, "max_tokens": 1}, streamed("Rivers"), False, "partial", BUDGET_SPENT),
        (
            {
                "model": "m",
                "messages": [*USER, {"role": "assistant", "content": [{"type": "text", "text": "A"}], "partial": True}],
            },
            streamed("B"),
            False,
            "partial",
            PREFIX_NOT_TEXT,
        ),
    ],
)
def test_where_partial_mode_cannot_apply_the_answer_starts_over_and_says_why(
    request_: dict[str, Any], seen: Streamed, finished: bool, mode: str, why: str
) -> None:
    decision = decide(request_, seen, finished=finished, mode=mode)
    assert (decision.resume, decision.restart_reason) == (False, why)
    assert decision.event_fields() == {"resume": False, "kept": None, "restart_reason": why}


def test_a_break_before_anything_was_shown_restarts_without_a_reason() -> None:
    opening = Streamed()
    opening.add(0, {"role": "assistant", "content": ""})
    decision = decide(PLAIN, opening, finished=False, mode="partial")
    assert (decision.resume, decision.restart_reason) == (False, None)


def test_the_continuation_appends_a_partial_message_and_shrinks_the_budget_as_written() -> None:
    seen = streamed("Rivers flow", "Think first.")
    seen.add(0, {"content": " north"})
    body = continuation({**PLAIN, "max_tokens": 50, "stop": "END", "sim": {"x": 1}}, seen)
    assert body["messages"][:-1] == USER
    assert body["messages"][-1] == {
        "role": "assistant",
        "content": "Rivers flow north",
        "partial": True,
        "reasoning_content": "Think first.",
    }
    # Three text fragments streamed: at least three tokens generated. max_tokens stays max_tokens.
    assert body["max_tokens"] == 47 and "max_completion_tokens" not in body
    assert body["stop"] == "END" and body["sim"] == {"x": 1}
    assert decide(PLAIN, seen, finished=False, mode="partial").event_fields() == {
        "resume": True,
        "kept": len("Rivers flow north"),
        "restart_reason": None,
    }


def test_a_callers_partial_prefix_is_extended_not_repeated() -> None:
    prefix = {"role": "assistant", "content": "Once upon", "name": "Kimi", "partial": True}
    body = continuation({"model": "m", "messages": [*USER, prefix]}, streamed(" a time"))
    assert body["messages"] == [*USER, {**prefix, "content": "Once upon a time"}]
    assert "max_completion_tokens" not in body  # the caller set no budget: none is invented


def test_usage_over_attempts_keeps_each_spelling_and_a_single_attempt_is_untouched() -> None:
    first = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    second = {
        "prompt_tokens": 20,
        "completion_tokens": 7,
        "total_tokens": 27,
        "prompt_tokens_details": {"cached_tokens": 9},
    }
    third = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "cached_tokens": 2}
    assert total_usage([first, second, third]) == {
        "prompt_tokens": 33,
        "completion_tokens": 13,
        "total_tokens": 46,
        "cached_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 11},
    }
    result = {"choices": [], "usage": first}
    assert settle(result, []) is result


def test_the_answer_state_estimates_an_attempt_that_broke_before_its_usage() -> None:
    answer = Answer(PLAIN, resume_mode="partial")
    answer.begin()
    broken = StreamAssembler()
    opening = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Rivers"}}]}
    for index, delta in broken.feed(opening):
        answer.published(index, delta)
    assert answer.broke(1, "connection_dropped", broken).resume
    assert answer.request["messages"][-1] == {"role": "assistant", "content": "Rivers", "partial": True}
    answer.begin()
    done = StreamAssembler()
    tail = {"index": 0, "delta": {"content": " flow."}, "finish_reason": "stop"}
    usage = {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
    for index, delta in done.feed({"choices": [tail], "usage": usage}):
        answer.published(index, delta)
    result = answer.answered(2, done.finish(), done)
    assert result is not None and result["choices"][0]["message"]["content"] == "Rivers flow."
    first, second = result["moonq"]["attempts"]
    assert first["estimated"] and first["outcome"] == "connection_dropped" and not first["resumed"]
    assert second == {"attempt": 2, "outcome": "completed", "resumed": True, "usage": usage}
    assert result["usage"]["total_tokens"] == first["usage"]["total_tokens"] + 14


# --- end to end through a node -------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_sim() -> Iterator[SimServer]:
    with SimServer(SHORT) as server:
        yield server


def runtime(redis_url: str, sim: SimServer, **overrides: Any) -> Runtime:
    settings = make_settings(
        redis_url,
        prefix=f"rs{uuid.uuid4().hex[:8]}",
        moonshot_base_url=sim.base_url,
        read_timeout_s=READ_TIMEOUT_S,
        **overrides,
    )
    return Runtime(settings).start()


@pytest.fixture(scope="module")
def node(redis_url: str, short_sim: SimServer) -> Iterator[tuple[Runtime, Settings]]:
    rt = runtime(redis_url, short_sim)
    yield rt, rt.settings
    rt.stop()


def run_job(node: tuple[Runtime, Settings], request: dict[str, Any], *script: str) -> tuple[Job, list[Event]]:
    rt, settings = node
    body = {**request, "sim": {"script": [*script, "ok"], "key": uuid.uuid4().hex}} if script else request
    with Client(settings=settings) as client:
        job = client.submit(body)
        assert rt.run(json.loads(job.record()["envelope"])) == "succeeded"
        return job, list(job.events())


def standing(events: list[Event], key: str = "content") -> str:
    """Choice 0's text as a subscriber is left with it: kept across a resume, dropped on a restart."""
    text = ""
    for event in events:
        if event.type == "retry":
            if event.resume:
                assert event.kept == len(text) or key != "content"
            else:
                text = ""
        elif event.type == "delta" and (event.index or 0) == 0:
            text += str((event.delta or {}).get(key) or "")
    return text


@pytest.fixture(scope="module")
def reference(node: tuple[Runtime, Settings]) -> dict[str, Any]:
    """Unbroken answers to the requests below, as the deterministic simulator gives them."""
    out = {}
    for name, request in REQUESTS.items():
        job, _ = run_job(node, request)
        out[name] = job.result(timeout=5).choices[0].message
    return out


PARTIAL: dict[str, Any] = {
    "model": "moonshot-v1-8k",
    "messages": [*USER, {"role": "assistant", "content": "Rivers", "partial": True}],
}
THINKING: dict[str, Any] = {"model": "kimi-k2-thinking", "messages": USER}
REQUESTS: dict[str, dict[str, Any]] = {"plain": PLAIN, "partial": PARTIAL, "thinking": THINKING}
FAULTS = [f"{kind}:{at}" for kind in ("drop", "truncate") for at in range(1, 16)] + [
    f"stall:{3 * READ_TIMEOUT_S}@{at}" for at in range(1, 16)
]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", ["plain", "partial"])
def test_every_break_point_leaves_one_continuous_answer(
    node: tuple[Runtime, Settings], reference: dict[str, Any], name: str, fault: str
) -> None:
    job, events = run_job(node, REQUESTS[name], fault)
    content = job.result(timeout=5).choices[0].message.content
    assert standing(events) == content == reference[name].content
    retries = [e for e in events if e.type == "retry"]
    assert len(retries) == 1
    # A break after text was shown continues it, unless the choice had already finished.
    shown = any(e.type == "delta" and (e.delta or {}).get("content") for e in events[: events.index(retries[0])])
    assert retries[0].resume == (shown and retries[0].restart_reason is None)
    assert retries[0].restart_reason in (None, ANSWER_FINISHED)


@pytest.mark.parametrize("at", range(1, 16))
def test_a_thinking_model_resumes_its_answer_but_never_its_reasoning(
    node: tuple[Runtime, Settings], reference: dict[str, Any], at: int
) -> None:
    job, events = run_job(node, THINKING, f"drop:{at}")
    message = job.result(timeout=5).choices[0].message
    assert (message.content, message.reasoning_content) == (
        reference["thinking"].content,
        reference["thinking"].reasoning_content,
    )
    assert standing(events) == message.content and standing(events, "reasoning_content") == message.reasoning_content
    (retry,) = [e for e in events if e.type == "retry"]
    before = events[: events.index(retry)]
    reasoning_only = any((e.delta or {}).get("reasoning_content") for e in before) and not any(
        (e.delta or {}).get("content") for e in before
    )
    if reasoning_only:
        assert (retry.resume, retry.restart_reason) == (False, REASONING_UNFINISHED)


def test_usage_is_what_every_attempt_billed(node: tuple[Runtime, Settings], short_sim: SimServer) -> None:
    short_sim.reset()
    job, _ = run_job(node, PLAIN, "drop:6")
    result = job.result(timeout=5)
    attempts = result.model_dump()["moonq"]["attempts"]
    assert [(a["attempt"], a["outcome"], a["resumed"], a.get("estimated", False)) for a in attempts] == [
        (1, "connection_dropped", False, True),
        (2, "completed", True, False),
    ]
    assert result.usage is not None
    assert result.usage.prompt_tokens == sum(a["usage"]["prompt_tokens"] for a in attempts)
    assert result.usage.completion_tokens == sum(a["usage"]["completion_tokens"] for a in attempts)
    # Both prompts count: the continuation's holds the text it continues.
    assert attempts[1]["usage"]["prompt_tokens"] > attempts[0]["usage"]["prompt_tokens"] / 2
    admitted = short_sim.stats()["admitted"]
    assert len(admitted) == 2 and admitted[1]["completion_tokens"] == attempts[1]["usage"]["completion_tokens"]
    # The estimate of the broken attempt errs high: never below what the simulator billed for it.
    assert attempts[0]["usage"]["total_tokens"] >= admitted[0]["charged_tokens"]


def test_restart_mode_starts_over(redis_url: str, short_sim: SimServer, reference: dict[str, Any]) -> None:
    rt = runtime(redis_url, short_sim, resume="restart")
    try:
        job, events = run_job((rt, rt.settings), PLAIN, "drop:6")
        (retry,) = [e for e in events if e.type == "retry"]
        assert (retry.resume, retry.kept, retry.restart_reason) == (False, None, RESUME_OFF)
        assert standing(events) == job.result(timeout=5).choices[0].message.content == reference["plain"].content
    finally:
        rt.stop()


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"response_format": {"type": "json_object"}}, JSON_MODE),
        ({"n": 2}, SEVERAL_CHOICES),
    ],
)
def test_fallbacks_end_to_end(node: tuple[Runtime, Settings], extra: dict[str, Any], why: str) -> None:
    job, events = run_job(node, {**PLAIN, **extra}, "drop:8")
    (retry,) = [e for e in events if e.type == "retry"]
    assert (retry.resume, retry.restart_reason) == (False, why)
    assert standing(events) == job.result(timeout=5).choices[0].message.content


def test_a_half_streamed_tool_call_starts_over(node: tuple[Runtime, Settings]) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    job, events = run_job(node, {**PLAIN, "model": "kimi-k2-turbo-preview", "tools": [tool]}, "drop:3")
    (retry,) = [e for e in events if e.type == "retry"]
    assert (retry.resume, retry.restart_reason) == (False, TOOL_CALL)
    assert job.result(timeout=5).choices[0].finish_reason == "tool_calls"


def test_a_stop_word_split_by_the_break_starts_over(node: tuple[Runtime, Settings], reference: dict[str, Any]) -> None:
    words = reference["plain"].content.split(" ")
    # Stop words that begin with a word of the answer and never complete: a break right after that word
    # leaves text ending in a stop word's beginning, which the continuation's own check could not see end.
    stops = [f"{word} qqq" for word in words[1:5]]
    cut = {**PLAIN, "stop": stops}
    unbroken, _ = run_job(node, cut)
    expected = unbroken.result(timeout=5).choices[0].message.content
    assert expected == reference["plain"].content
    outcomes = set()
    for at in range(1, 16):
        job, events = run_job(node, cut, f"drop:{at}")
        assert standing(events) == job.result(timeout=5).choices[0].message.content == expected
        outcomes |= {(e.resume, e.restart_reason) for e in events if e.type == "retry"}
    assert {(True, None), (False, STOP_WORD)} <= outcomes  # most breaks resume; one inside the stop word cannot


# --- through the gateway, with the official SDK ---------------------------------------------------


@pytest.fixture(scope="module")
def gateway(redis_url: str) -> Iterator[str]:
    with serve_gateway(GatewaySettings(redis_url=redis_url, gateway_tokens="gw-resume-token")) as url:
        yield url


@pytest.fixture
def sdk(gateway: str, worker: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway}/v1", api_key="gw-resume-token", max_retries=0) as client:
        yield client


@pytest.mark.parametrize("fault", ["drop:4", "truncate:7", "corrupt:5", "drop:1"])
def test_the_gateway_stream_goes_on_across_a_break(sdk: Any, client: Client, fault: str) -> None:
    plain = sdk.chat.completions.create(model="moonshot-v1-8k", messages=USER)
    sim = {"script": [fault, "ok"], "key": uuid.uuid4().hex}
    stream = sdk.chat.completions.with_raw_response.create(
        model="moonshot-v1-8k",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"sim": sim},
    )
    job = client.job(stream.headers["X-Moonq-Job-Id"])
    chunks = list(stream.parse())  # an error in the stream would raise here
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert text == plain.choices[0].message.content == job.result(timeout=5).choices[0].message.content
    assert roles == ["assistant"]
    usage = chunks[-1].usage
    total = job.result(timeout=5).usage
    assert usage is not None and total is not None and usage.total_tokens == total.total_tokens
    assert any(e.type == "retry" for e in job.events())
