"""Hostile requests at the HTTP gateway: each answered in Moonshot's error body, naming the field and the rule.

Oversized, deeply nested, invalid UTF-8, lone surrogates, NaN, huge integers, huge stop lists,
odd headers: a clear 4xx, never a 500; and whatever odd but valid request is accepted comes
back as a completion (no job is lost).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import GatewaySettings
from moonq.request import MAX_JSON_DEPTH, validate_request
from tests.helpers import nested, serve_gateway

TOKEN = "gw-hostile-token"
USER = [{"role": "user", "content": "hi"}]


LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def gateway(redis_url: str) -> Iterator[str]:
    with serve_gateway(GatewaySettings(redis_url=redis_url, gateway_tokens=TOKEN, gateway_max_body_bytes=LIMIT)) as url:
        yield url


AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "moonshot-v1-8k", "messages": USER, **fields}).encode()


def chunked(data: bytes, size: int = 16384) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


GATEWAY_CASES: list[tuple[str, bytes, dict[str, Any], int, str]] = [
    ("deep JSON", b"[" * 100_000 + b"]" * 100_000, {}, 400, "request: is not valid JSON: nested too deeply"),
    ("deep field", body(x=nested(500)), {}, 400, "Invalid request: x.0.k.0.k.0.k.0.k.0.k.0.k.0.k.0.k.0.k.0.k.0"),
    ("deep field rule", body(x=nested(500)), {}, 400, f"is nested deeper than {MAX_JSON_DEPTH} levels"),
    ("huge stop list", body(stop=["s"] * 20_000), {}, 400, "stop: at most 5 stop words (got 20000)"),
    ("long stop word", body(stop=["月" * 11]), {}, 400, "stop: each stop word is at most 32 bytes (got 33)"),
    ("invalid UTF-8", body().replace(b'"hi"', b'"\xff\xfe"'), {}, 400, "request: is not valid JSON: 'utf-8' codec"),
    (
        "surrogate escape",
        body(messages=[{"role": "user", "content": "\ud800"}]),
        {},
        400,
        "messages.0.content: is not valid Unicode: lone surrogate U+D800",
    ),
    (
        "CESU-8 surrogate bytes",
        body().replace(b'"hi"', b'"\xed\xa0\x80"'),
        {},
        400,
        "messages.0.content: is not valid Unicode",
    ),
    ("NaN", body()[:-1] + b', "temperature": NaN}', {}, 400, "request: is not valid JSON: NaN is not a JSON"),
    ("Infinity", body()[:-1] + b', "x": -Infinity}', {}, 400, "-Infinity is not a JSON value"),
    ("2^100", body(max_completion_tokens=2**100), {}, 400, "max_completion_tokens: integer out of range"),
    ("5000 digits", body()[:-1] + b', "n": ' + b"9" * 5000 + b"}", {}, 400, "an integer has more than 4300 digits"),
    ("array body", b"[]", {}, 400, "request: must be a JSON object (got list)"),
    ("empty body", b"", {}, 400, "request: is not valid JSON"),
    ("unknown role", body(messages=[{"role": "bot", "content": "x"}]), {}, 400, "messages.0.role: must be one of"),
    ("streamed oversize", b"", {"stream": body(pad="x" * LIMIT)}, 413, f"body: is larger than {LIMIT} bytes"),
    ("superscript priority", body(), {"X-Moonq-Priority": b"\xb2"}, 400, "X-Moonq-Priority: must be an integer"),
    ("long priority", body(), {"X-Moonq-Priority": "0" * 5000}, 400, "X-Moonq-Priority: must be an integer"),
    ("empty idempotency key", body(), {"Idempotency-Key": ""}, 400, "Idempotency-Key: must be 1 to 255 characters"),
]


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/chat/completions"])
@pytest.mark.parametrize(("name", "raw", "extra", "status", "says"), GATEWAY_CASES, ids=[c[0] for c in GATEWAY_CASES])
def test_gateway_answers_hostile_bodies_with_moonshot_errors(
    gateway: str, path: str, name: str, raw: bytes, extra: dict[str, Any], status: int, says: str
) -> None:
    headers = {**AUTH, **{k: v for k, v in extra.items() if k != "stream"}}
    content = chunked(extra["stream"]) if "stream" in extra else raw  # a generator: no Content-Length
    r = httpx.post(f"{gateway}{path}", content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(r.json()) == {"error"} and set(err) == {"message", "type"}
    assert err["type"] == "invalid_request_error"
    assert err["message"].startswith("Invalid request: ") and says in err["message"], err["message"][:300]


@pytest.mark.parametrize("last", [b"\xb2", b"1" * 30, b"-1", b"1e3", "٣".encode()])
def test_a_hostile_last_event_id_is_a_clear_400(gateway: str, last: bytes) -> None:
    headers = [(k.encode(), v.encode()) for k, v in AUTH.items()] + [(b"Last-Event-ID", last)]
    r = httpx.get(f"{gateway}/v1/jobs/any/events", headers=headers, timeout=10)
    assert r.status_code == 400 and "Last-Event-ID: must be a sequence number" in r.json()["error"]["message"]


def test_undeclared_methods_get_405_with_allow(gateway: str) -> None:
    r = httpx.request("TRACE", f"{gateway}/v1/jobs/some-id", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "DELETE"}


@pytest.mark.parametrize("stream", [False, "false", 0, True, "true"])
@settings(
    max_examples=4,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(contents=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=2))
def test_odd_but_valid_requests_are_never_lost(gateway: str, worker: Any, stream: Any, contents: list[str]) -> None:
    # NULs, control characters, emoji, RTL marks, CJK: whatever passes validation comes back as a completion.
    messages = [{"role": "user", "content": c} for c in contents]
    r = httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"model": "moonshot-v1-8k", "messages": messages, "stream": stream},
        headers=AUTH,
        timeout=30,
    )
    if not isinstance(stream, bool):
        # Issue 14: a value that is not a boolean is refused, never converted into one.
        assert r.status_code == 400 and "stream: Input should be a valid boolean" in r.json()["error"]["message"]
        return
    assert r.status_code == 200, r.text[:300]
    job_id = r.headers["x-moonq-job-id"]
    # The validated request decides.
    if validate_request({"model": "m", "messages": messages, "stream": stream}).stream:
        assert r.headers["content-type"].startswith("text/event-stream") and r.text.endswith("data: [DONE]\n\n")
    else:
        assert r.headers["content-type"] == "application/json" and r.json()["choices"][0]["message"]["content"]
    state = httpx.get(f"{gateway}/v1/jobs/{job_id}", headers=AUTH, timeout=10).json()
    assert state["status"] == "succeeded"
