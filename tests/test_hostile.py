"""Hostile input, property-based: request validation, the wire models and the SSE decoder.

Whatever arrives, the answer is a clear error naming the field and the rule, never a crash or a
stalled loop (the gateway's side is in test_hostile_gateway.py, the worker's in
test_hostile_worker.py). Hypothesis runs derandomized (the same examples every run, so CI is
stable); ``MOONQ_HYPOTHESIS_EXAMPLES`` raises the count for a deeper local run.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.stream import ChunkStream
from moonq.errors import InvalidRequest
from moonq.jsonsafe import json_problem
from moonq.request import MAX_JSON_DEPTH, MAX_STOP_BYTES, ChatRequest, validate_request
from moonq.wire import ChatCompletion, Event, JobEnvelope
from tests.helpers import nested
from worker.errors import StreamInterrupted
from worker.sse import MAX_EVENT_BYTES, SSEDecoder, SSEEvent

EXAMPLES = int(os.environ.get("MOONQ_HYPOTHESIS_EXAMPLES", "150"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
USER = [{"role": "user", "content": "hi"}]
KNOWN_FIELDS = sorted({*ChatRequest.model_fields, "max_tokens"})

# --- strategies -------------------------------------------------------------------------------

# Text as it can travel (no lone surrogates), and text as a Python caller can hand it over.
text = st.text(max_size=12)
any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=12)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63) + 1, 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=12
)


# What a hostile caller sends: broken Unicode, non-finite floats, huge integers, deep nesting, odd types.
hostile_scalars = (
    json_scalars
    | any_text
    | st.sampled_from([math.nan, math.inf, -math.inf, 10**30, -(10**400), 2**63, b"\xff", object(), {1, 2}])
)
hostile_values = st.recursive(
    hostile_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(any_text | st.integers(), inner, max_size=3)
        | st.builds(nested, st.sampled_from([MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH + 1, 300]), inner)
    ),
    max_leaves=8,
)

stop_word = st.text(min_size=1, max_size=8).filter(lambda w: len(w.encode()) <= MAX_STOP_BYTES)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user"]), "content": st.text(min_size=1, max_size=40)},
    optional={"name": text},
)
unknown_key = text.filter(lambda k: k not in KNOWN_FIELDS)


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    request: dict[str, Any] = {
        "model": draw(st.sampled_from(["moonshot-v1-8k", "kimi-k2-turbo-preview", "x"])),
        "messages": draw(st.lists(message, min_size=1, max_size=3)),
    }
    optional = {
        "temperature": st.floats(0, 1),
        "top_p": st.floats(0, 1),
        "n": st.integers(1, 5),
        "presence_penalty": st.floats(-2, 2),
        "max_completion_tokens": st.integers(1, 2**31),
        "stop": stop_word | st.lists(stop_word, max_size=5),
        "stream": st.booleans(),
        "prompt_cache_key": text,
    }
    for name in sorted(draw(st.sets(st.sampled_from(sorted(optional))))):  # sorted: str hashes vary per run
        request[name] = draw(optional[name])
    if request.get("n", 1) > 1 and request.get("temperature", 1) < 0.01 and request["model"] != "x":
        del request["n"]  # a documented per-model rule refuses several answers near temperature 0 (issue 14)
    request.update(draw(st.dictionaries(unknown_key, json_values, max_size=2)))
    return request


@st.composite
def hostile_requests(draw: st.DrawFn) -> Any:
    """A valid request with a few fields (known, unknown or inside a message) replaced by hostile values."""
    request: Any = draw(valid_requests())
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "message", "whole"]))
        value = draw(hostile_values)
        if where == "whole":
            return value if draw(st.booleans()) else request
        messages = request.get("messages")
        has_message = isinstance(messages, list) and messages and isinstance(messages[0], dict)
        target = messages[0] if where == "message" and has_message else request
        target[draw(st.sampled_from(KNOWN_FIELDS) | unknown_key | st.just("content"))] = value
    return request


# --- validate_request and the wire models -------------------------------------------------------


def _is_plain_json(payload: Any) -> None:
    encoded = json.dumps(payload, allow_nan=False, ensure_ascii=False).encode("utf-8")  # strict: raises if not
    assert json.loads(encoded) == payload


@PROPERTY
@given(hostile_requests())
def test_any_request_is_accepted_as_plain_json_or_refused_naming_field_and_rule(request: Any) -> None:
    try:
        valid = validate_request(request)
    except InvalidRequest as err:
        assert err.errors, err
        for field, rule in err.errors:
            assert field and rule, err.errors
            assert f"{field}: {rule}" in str(err) and "\n" not in field and "\r" not in field
        return
    payload = valid.to_payload()
    _is_plain_json(payload)
    # What a producer enqueues and a worker reads back: the same envelope, by JSON (kombu) and by pydantic.
    envelope = JobEnvelope(job_id="j", request=payload)
    assert JobEnvelope.model_validate(json.loads(json.dumps(envelope.model_dump(mode="json")))) == envelope
    assert JobEnvelope.model_validate_json(envelope.model_dump_json()) == envelope


@PROPERTY
@given(valid_requests())
def test_valid_requests_pass_through_unchanged(request: dict[str, Any]) -> None:
    assert validate_request(request).to_payload() == request


@pytest.mark.parametrize(
    ("request_", "field", "rule"),
    [
        ({"model": "m", "messages": USER, "x": nested(200)}, "x.0.k.0.k", f"nested deeper than {MAX_JSON_DEPTH}"),
        ({"model": "m", "messages": [{"role": "user", "content": "a\ud800"}]}, "messages.0.content", "surrogate"),
        ({"model": "m", "messages": USER, "stop": ["ok", "\udfff"]}, "stop.1", "lone surrogate U+DFFF"),
        ({"model": "m", "messages": USER, "extra": {"\ud83d": 1}}, "extra", "key '\\ud83d'"),
        ({"model": "m", "messages": USER, "seed": math.nan}, "seed", "must be a finite number"),
        ({"model": "m", "messages": USER, "max_completion_tokens": 10**30}, "max_completion_tokens", "out of range"),
        ({"model": "m", "messages": USER, "n": 10**5000}, "n", "out of range"),  # repr() of it would raise
        ({"model": "m", "messages": USER, "meta": b"\xff"}, "meta", "is not a JSON value (got bytes)"),
        ({"model": "m", "messages": USER, "meta": {1: "a"}}, "meta", "keys must be strings"),
        ({"model": "m", "messages": USER, "stop": ["s"] * 100_000}, "stop", "at most 5 stop words (got 100000)"),
    ],
    ids=[
        "deep",
        "surrogate",
        "stop-surrogate",
        "surrogate-key",
        "nan",
        "int64",
        "5000-digits",
        "bytes",
        "int-key",
        "huge-stop-list",
    ],
)
def test_unportable_json_is_refused_naming_field_and_rule(request_: Any, field: str, rule: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_request(request_)
    assert str(info.value).startswith(field), str(info.value)[:300]
    assert rule in str(info.value), str(info.value)[:300]


def test_a_chat_request_built_directly_is_checked_too() -> None:
    with pytest.raises(ValidationError, match="must be a finite number"):
        ChatRequest(model="m", messages=USER, x=math.inf)


@PROPERTY
@given(st.dictionaries(text | st.sampled_from(["v", "job_id", "request", "priority", "enqueued_at"]), json_values))
def test_envelope_from_anything_is_valid_or_a_validation_error(data: dict[str, Any]) -> None:
    try:
        envelope = JobEnvelope.model_validate(data)
    except ValidationError:
        return
    assert JobEnvelope.model_validate_json(envelope.model_dump_json()) == envelope


@PROPERTY
@given(
    st.builds(
        Event,
        job_id=text,
        seq=st.integers(1, 2**53),
        type=text,  # unknown types included: new ones may be added (docs/contract.md)
        attempt=st.none() | st.integers(1, 100),
        index=st.none() | st.integers(0, 4),
        delta=st.none() | st.dictionaries(text, json_values, max_size=3),
        reason=st.none() | text,
        delay_s=st.none() | st.floats(0, 1e6),
    )
)
def test_events_round_trip_and_only_known_types_end_a_job(event: Event) -> None:
    assert Event.model_validate_json(event.model_dump_json()) == event
    assert event.terminal == (event.type in ("completed", "failed", "cancelled"))


@PROPERTY
@given(
    st.dictionaries(
        st.sampled_from(["id", "object", "created", "model", "choices", "usage"]) | text, json_values, max_size=6
    )
)
def test_upstream_completion_is_parsed_tolerantly_keeping_unknown_fields(data: dict[str, Any]) -> None:
    try:
        completion = ChatCompletion.model_validate(data)
    except ValidationError:
        return
    assert set(data) <= set(completion.model_dump())


def test_an_unknown_event_type_is_skipped_by_the_chat_stream() -> None:
    stream = ChunkStream("j", "m", 0, include_usage=False)
    assert stream.feed(Event(job_id="j", seq=1, type="progress-v2", delta={"x": 1})) == b""
    assert not stream.done
    result = {"choices": [{"index": 0, "finish_reason": "stop"}], "usage": {"total_tokens": 1}}
    assert stream.feed(Event(job_id="j", seq=2, type="completed", result=result)).endswith(b"data: [DONE]\n\n")
    assert stream.done


# --- the SSE decoder ----------------------------------------------------------------------------


def decode(parts: list[bytes]) -> list[SSEEvent]:
    dec = SSEDecoder()
    out: list[SSEEvent] = []
    for part in parts:
        out += dec.feed(part)
    return out + dec.flush()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@PROPERTY
@given(
    st.binary(max_size=600) | st.lists(st.sampled_from([b"data:", b" x", b"\r", b"\n", b":", b"\xff"])).map(b"".join),
    st.lists(st.integers(0, 600), max_size=8),
)
def test_any_bytes_split_anywhere_decode_the_same_and_never_raise(data: bytes, cuts: list[int]) -> None:
    assert decode(split_at(data, cuts)) == decode([data])


line_text = st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), max_size=10)
sse_events = st.lists(
    st.tuples(
        st.text(max_size=30),  # data, line terminators included: sent as several data lines
        st.none() | line_text,  # event type: any name, unknown ones included
        st.none() | line_text.filter(lambda i: "\0" not in i),  # id
        st.lists(st.sampled_from([": comment", "retry: 5", "x-vendor: 1", "eventtype: y", "data"]), max_size=2),
    ),
    max_size=5,
)


@PROPERTY
@given(sse_events, st.sampled_from(["\n", "\r\n", "\r"]), st.lists(st.integers(0, 2000), max_size=6))
def test_events_survive_any_line_ending_and_any_split(
    events: list[tuple[str, str | None, str | None, list[str]]], eol: str, cuts: list[int]
) -> None:
    wire, expected, last_id = [], [], None
    for data, type_, id_, noise in events:
        lines = [*[n for n in noise if n != "data"], *([f"event: {type_}"] if type_ is not None else [])]
        lines += [f"id: {id_}"] if id_ is not None else []
        lines += [f"data: {line}" for line in re.split(r"\r\n|\r|\n", data)]
        lines += ["data"] if "data" in noise else []  # a bare field name: an empty data line
        wire.append(eol.join(lines) + eol + eol)
        last_id = id_ if id_ is not None else last_id
        body = "\n".join(re.split(r"\r\n|\r|\n", data) + ([""] if "data" in noise else []))
        expected.append(SSEEvent(body, event=type_, id=last_id))
    raw = "".join(wire).encode()
    assert decode(split_at(raw, cuts)) == expected


@PROPERTY
@given(st.binary(max_size=200).filter(lambda b: b"\r" not in b and b"\n" not in b))
def test_invalid_utf8_is_replaced_never_raised(payload: bytes) -> None:
    want = payload.decode("utf-8", errors="replace").removeprefix(" ")
    assert decode([b"data:" + payload + b"\n\n"]) == [SSEEvent(want)]


def test_many_events_in_one_chunk_decode_in_linear_time() -> None:
    # One asyncio loop serves every job of a node: a big chunk must not stall it (was 13 s for 1.6 MB).
    data = b'data: {"choices":[]}\n\n' * 100_000
    started = time.perf_counter()
    assert len(SSEDecoder().feed(data)) == 100_000
    # A long line arriving in small pieces is not rescanned from its start each time either.
    dec, line = SSEDecoder(), b"data: " + b"x" * (8 << 20)
    for i in range(0, len(line), 4096):
        assert dec.feed(line[i : i + 4096]) == []
    assert [len(e.data) for e in dec.feed(b"\n\n")] == [8 << 20]
    assert time.perf_counter() - started < 5.0  # about 0.3 s here; quadratic was minutes


def test_a_runaway_line_or_event_ends_the_stream_clearly() -> None:
    dec = SSEDecoder()
    with pytest.raises(StreamInterrupted, match="longer than"):
        for _ in range(MAX_EVENT_BYTES // (1 << 20) + 2):
            dec.feed(b"x" * (1 << 20))
    dec, line = SSEDecoder(), b"data: " + b"y" * (1 << 20) + b"\n"
    with pytest.raises(StreamInterrupted, match="SSE event is longer than"):
        for _ in range(MAX_EVENT_BYTES // (1 << 20) + 2):
            dec.feed(line)


def _reference_problem(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` breaks a plain-JSON rule, by plain recursion (what ``json_problem`` must agree with)."""
    if isinstance(value, dict | list | tuple):
        if depth >= MAX_JSON_DEPTH:
            return True
        if isinstance(value, dict) and any(not isinstance(k, str) or re.search("[\ud800-\udfff]", k) for k in value):
            return True
        items = value.values() if isinstance(value, dict) else value
        return any(_reference_problem(item, depth + 1) for item in items)
    if isinstance(value, str):
        return re.search("[\ud800-\udfff]", value) is not None
    if value is None or isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) > 2**63 - 1
    if isinstance(value, float):
        return not math.isfinite(value)
    return True


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xFFFF), max_size=5),
    st.binary(max_size=2),
)
_keys = st.one_of(st.text(max_size=3), st.text(alphabet="\ud800x", max_size=2), st.integers(0, 3), st.none())
_documents = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.tuples(inner, inner), st.dictionaries(_keys, inner, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_documents, st.integers(0, MAX_JSON_DEPTH + 2))
def test_the_plain_json_check_agrees_with_plain_recursion(document: Any, wrap: int) -> None:
    # json_problem walks with a stack and checks scalars where it finds them (faster); wrapped in up to
    # MAX_JSON_DEPTH + 2 lists, the depth rule is crossed too. It must find a problem exactly when there is one.
    for _ in range(wrap):
        document = [document]
    found = json_problem(document)
    assert (found is not None) == _reference_problem(document), found
