"""The HTTP gateway with the official OpenAI SDK and plain httpx, against the real worker."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.app import GatewaySettings, create_app
from producers import Client
from simulator.server import serve_in_thread
from worker.settings import Settings

TOKEN = "gw-test-token-1"
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello through the gateway."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def gateway(redis_url: str) -> Iterator[str]:
    settings = GatewaySettings(redis_url=redis_url, gateway_tokens=f"other-token, {TOKEN}")
    with serve_in_thread(create_app(settings), lifespan=True) as url:  # the app closes its Redis at shutdown
        yield url


@pytest.fixture
def sdk(gateway: str, worker: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway}/v1", api_key=TOKEN, max_retries=0) as client:
        yield client


def test_sdk_create(sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(model="moonshot-v1-8k", messages=USER)
    assert completion.object == "chat.completion" and completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0


def test_sdk_stream_with_usage(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="moonshot-v1-8k",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    again = sdk.chat.completions.create(model="moonshot-v1-8k", messages=USER)
    assert again.choices[0].message.content == text  # the simulator is deterministic: same answer


def test_sdk_tools_streamed(sdk: openai.OpenAI) -> None:
    kwargs: Any = {
        "model": "kimi-k2.5",
        "messages": USER,
        "tools": [WEATHER],
        "temperature": 0.6,
        "extra_body": {"thinking": {"type": "disabled"}},
    }
    completion = sdk.chat.completions.create(**kwargs)
    call = completion.choices[0].message.tool_calls[0]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert "city" in json.loads(call.function.arguments)
    args = ""
    for chunk in sdk.chat.completions.create(**kwargs, stream=True):
        for frag in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            args += frag.function.arguments or "" if frag.function else ""
    assert json.loads(args) == json.loads(call.function.arguments)


def test_sdk_errors(gateway: str, sdk: openai.OpenAI) -> None:
    with (
        openai.OpenAI(base_url=f"{gateway}/v1", api_key="wrong", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.chat.completions.create(model="moonshot-v1-8k", messages=USER)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="moonshot-v1-8k", messages=USER, stop=list("abcdef"))
    assert "stop: at most 5 stop words" in str(info.value)
    with pytest.raises(openai.NotFoundError):  # the upstream's 404, passed through
        sdk.chat.completions.create(model="kimi-k9-nope", messages=USER)


def h(token: str = TOKEN, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def test_auth_and_size_limits(gateway: str) -> None:
    assert httpx.post(f"{gateway}/v1/jobs", json={}).status_code == 401
    r = httpx.post(f"{gateway}/v1/jobs", json={}, headers={"Authorization": "Basic x"})
    assert r.status_code == 401 and r.json() == {
        "error": {"message": "Invalid Authentication", "type": "invalid_authentication_error"}
    }
    assert httpx.post(f"{gateway}/v1/jobs", json={}, headers=h("other-token")).status_code == 400  # second token ok
    # A declared 200 MB body is refused from its headers, before a byte of it is read.
    host, port = gateway.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {200 * 1024 * 1024}\r\n\r\n".encode()
        )
        sock.settimeout(10)
        data = b""
        while b"invalid_request_error" not in data:  # headers and body may come in separate segments
            part = sock.recv(4096)
            if not part:
                break
            data += part
    assert data.startswith(b"HTTP/1.1 413") and b"invalid_request_error" in data
    assert httpx.get(f"{gateway}/healthz").json() == {"ok": True}
    spec = httpx.get(f"{gateway}/openapi.json").json()
    assert spec["openapi"].startswith("3.1") and "/v1/jobs/{job_id}/events" in spec["paths"]


def test_jobs_api_and_sse_resume(gateway: str, worker: Any) -> None:
    request = {"model": "moonshot-v1-8k", "messages": USER}
    accepted = httpx.post(f"{gateway}/v1/jobs", json=request, headers=h())
    assert accepted.status_code == 202
    job_id = accepted.json()["id"]

    def read(headers: dict[str, str], stop_after: int | None = None) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        with httpx.stream("GET", f"{gateway}/v1/jobs/{job_id}/events", headers=headers, timeout=30) as resp:
            assert resp.status_code == 200
            current: dict[str, Any] = {}
            for line in resp.iter_lines():
                if line.startswith("id: "):
                    current["id"] = int(line[4:])
                elif line.startswith("data: "):
                    current["data"] = json.loads(line[6:])
                elif line == "" and current:
                    got.append(current)
                    current = {}
                    if stop_after is not None and len(got) >= stop_after:
                        break  # a client that drops the connection mid-job
        return got

    first = read(h(), stop_after=3)
    rest = read(h(**{"Last-Event-ID": str(first[-1]["id"])}))
    seqs = [e["id"] for e in first + rest]
    assert seqs == list(range(1, len(seqs) + 1))  # no loss, no repeats
    assert all(e["id"] == e["data"]["seq"] for e in first + rest)
    assert rest[-1]["data"]["type"] == "completed"
    state = httpx.get(f"{gateway}/v1/jobs/{job_id}", headers=h()).json()
    assert state["status"] == "succeeded" and state["result"]["choices"][0]["message"]["content"]
    assert httpx.delete(f"{gateway}/v1/jobs/{job_id}", headers=h()).status_code == 409
    missing = httpx.get(f"{gateway}/v1/jobs/nope", headers=h())
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "resource_not_found_error"


def test_a_follower_that_hangs_up_leaves_no_subscription_and_the_job_runs_on(
    gateway: str, settings: Settings, worker: Any
) -> None:
    """``/v1/jobs/{id}/events`` only watches: a caller gone mid-stream ends its stream at once (the gateway
    gives its subscription back) and the job goes on to its end."""
    request = {"model": "moonshot-v1-8k", "messages": USER, "sim": {"fault": "slow_first:2"}}
    job_id = httpx.post(f"{gateway}/v1/jobs", json=request, headers=h()).json()["id"]
    channel = settings.keys.events(job_id)
    with Client(settings=settings) as client:
        r = client.redis
        with httpx.stream("GET", f"{gateway}/v1/jobs/{job_id}/events", headers=h(), timeout=10) as resp:
            assert resp.status_code == 200
            deadline = time.monotonic() + 5
            while r.pubsub_numsub(channel)[0][1] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert r.pubsub_numsub(channel)[0][1] == 1  # the gateway follows the job
        deadline = time.monotonic() + 5  # hung up, before the first token
        while r.pubsub_numsub(channel)[0][1] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert r.pubsub_numsub(channel)[0][1] == 0
        assert client.job(job_id).result(timeout=30).choices[0].message.content


def test_idempotency_key_header(gateway: str, fresh_prefix: Settings) -> None:
    request = {"model": "moonshot-v1-8k", "messages": USER}
    key = uuid.uuid4().hex
    a = httpx.post(f"{gateway}/v1/jobs", json=request, headers=h(**{"Idempotency-Key": key})).json()
    b = httpx.post(f"{gateway}/v1/jobs", json=request, headers=h(**{"Idempotency-Key": key})).json()
    assert a["id"] == b["id"]
    clash = httpx.post(f"{gateway}/v1/jobs", json={**request, "n": 2}, headers=h(**{"Idempotency-Key": key}))
    assert clash.status_code == 400 and "idempotency_key" in clash.json()["error"]["message"]


def test_a_streaming_caller_that_hangs_up_cancels_its_job(gateway: str, settings: Settings, worker: Any) -> None:
    request = {"model": "moonshot-v1-8k", "messages": USER, "stream": True, "sim": {"fault": "slow_first:3"}}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=request, headers=h(), timeout=10) as resp:
        job_id = resp.headers["X-Moonq-Job-Id"]
    # The caller is gone before the first token: the job is cancelled, not left to spend tokens.
    with Client(settings=settings) as client:
        deadline = time.monotonic() + 5
        while client.job(job_id).status() != "cancelled" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.job(job_id).status() == "cancelled"
