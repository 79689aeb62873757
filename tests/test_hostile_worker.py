"""Hostile input on the worker side: a hostile upstream, and crafted messages on the queue.

A real ``celery -A worker worker`` process (own prefix) consumes jobs that a hostile upstream
answers, and the gateway serves them: odd but legal streams complete, broken ones end as clear
failures, crafted queue messages (pickle, non-JSON, malformed envelopes) are refused without
running code and without stalling the node; a malformed envelope ends its job ``failed`` (type
``invalid_envelope``) once, instead of coming back from the queue forever.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.app import GatewaySettings
from harness import WorkerProcess
from moonq.broker import producer_app
from moonq.wire import TASK_NAME, JobEnvelope
from producers import Client
from simulator.server import serve_in_thread
from tests.helpers import make_settings, nested, node_env, serve_gateway
from worker.app import create_app
from worker.loop import Runtime
from worker.settings import Settings
from worker.sse import MAX_EVENT_BYTES

TOKEN = "gw-hostile-worker"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USER = [{"role": "user", "content": "hi"}]


def frame(data: Any, *, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def chunk(delta: Any, finish: str | None = None, *, index: Any = 0, **extra: Any) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "finish_reason": finish}
    if finish:
        choice["usage"] = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    return {"id": "cmpl-h", "object": "chat.completion.chunk", "created": 1, "model": "h", "choices": [choice], **extra}


OPEN = frame(chunk({"role": "assistant", "content": ""}))
END = [frame(chunk({}, "stop")), b"data: [DONE]\n\n"]
MOON = "月".encode()

# Model name -> the frames the hostile upstream sends for it (each frame one body chunk).
SCRIPTS: dict[str, list[bytes]] = {
    "ok": [OPEN, frame(chunk({"content": "fine"})), *END],
    # Event types and fields nobody documented, comments, an event without data: all ignored.
    "unknown-events": [
        b": keep-alive\n\n",
        b"event: moonshot.heartbeat\nid: 7\nretry: 100\nx-vendor: 1\ndata: "
        + json.dumps({"choices": []}).encode()
        + b"\n\n",
        b"event: ping\n\n",
        OPEN,
        frame(chunk({"content": "Hello"}), event="brand-new-type"),
        frame(chunk({"content": " world"}), event="error-but-not-really"),
        *END,
    ],
    # Invalid UTF-8 inside a JSON string is replaced; a character split across body chunks is not.
    "invalid-utf8": [
        OPEN,
        b'data: {"choices":[{"index":0,"delta":{"content":"ok \xff\xfe ' + MOON[:1],
        MOON[1:] + b'"}}]}\n\n',
        *END,
    ],
    # NaN is not JSON, but Python's json (ours and some upstreams') writes it.
    "nan-in-answer": [OPEN, frame(chunk({"content": "ok"}, logprob=math.nan, score=-math.inf)), *END],
    "garbage": [OPEN, b"data: {not json\n\n"],
    "not-a-chunk": [b"data: [1, 2]\n\n"],
    "choices-not-a-list": [frame({"choices": "abc"})],
    "error-inside-stream": [
        frame({"error": {"message": "overloaded inside the stream", "type": "engine_overloaded_error"}}, event="error")
    ],
    "no-done": [OPEN, frame(chunk({"content": "cut"})), frame(chunk({}, "stop"))],
    "runaway-line": [b"data: "] + [b"x" * (1 << 20)] * (MAX_EVENT_BYTES // (1 << 20) + 1),
    # JSON in the wrong shape for a chunk (see MALFORMED_CHUNKS below).
    "index-not-a-number": [OPEN, frame(chunk({"content": "a"}, index="first")), *END],
    "index-null": [OPEN, frame(chunk({"content": "a"}, index=None)), *END],
    "delta-not-an-object": [OPEN, frame(chunk("just text")), *END],
    "tool-call-garbage": [OPEN, frame(chunk({"tool_calls": [{"index": 0, "function": "f"}]})), *END],
    "deep-chunk": [OPEN, b'data: {"choices":[],"x":' + b"[" * 50_000 + b"]" * 50_000 + b"}\n\n", *END],
    "deep-delta": [OPEN, frame(chunk({"content": "a", "x": nested(300)})), *END],
}


async def chat(request: Request) -> Response:
    frames = SCRIPTS[(await request.json())["model"]]

    async def body() -> AsyncIterator[bytes]:
        for f in frames:
            yield f

    return StreamingResponse(body(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with serve_in_thread(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])) as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def node_settings(redis_url: str) -> Settings:
    return make_settings(redis_url, prefix=f"hw{uuid.uuid4().hex[:8]}", max_attempts=2)


@pytest.fixture(scope="module")
def node(node_settings: Settings, upstream: str) -> Iterator[WorkerProcess]:
    # A real node (its own process: a poisoned one cannot disturb the suite's embedded worker).
    with WorkerProcess(node_env(node_settings, upstream, MOONQ_MAX_ATTEMPTS="2")) as proc:
        yield proc
        proc.stop(timeout_s=10)


@pytest.fixture(scope="module")
def gateway(node_settings: Settings, node: WorkerProcess) -> Iterator[str]:
    gw = GatewaySettings(redis_url=node_settings.redis_url, prefix=node_settings.prefix, gateway_tokens=TOKEN)
    with serve_gateway(gw) as url:
        yield url


def ask(gateway: str, model: str, **extra: Any) -> httpx.Response:
    request = {"model": model, "messages": USER, **extra}
    return httpx.post(f"{gateway}/v1/chat/completions", json=request, headers=AUTH, timeout=30)


# --- a hostile upstream, end to end ------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "content"),
    [("unknown-events", "Hello world"), ("invalid-utf8", "ok \ufffd\ufffd 月"), ("nan-in-answer", "ok")],
)
def test_odd_but_legal_streams_complete(gateway: str, model: str, content: str) -> None:
    r = ask(gateway, model)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["choices"][0]["message"]["content"] == content
    state = httpx.get(f"{gateway}/v1/jobs/{r.headers['x-moonq-job-id']}", headers=AUTH, timeout=10)
    assert state.status_code == 200 and state.json()["status"] == "succeeded", state.text[:300]
    if model == "nan-in-answer":  # not JSON: read as null upstream (worker/upstream.py), never a 500
        assert state.json()["result"].get("logprob") is None and r.json().get("score") is None
        assert "NaN" not in state.text and "Infinity" not in state.text
    streamed = ask(gateway, model, stream=True)
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    assert "NaN" not in streamed.text and "Infinity" not in streamed.text


@pytest.mark.parametrize(
    ("model", "type_", "says"),
    [
        ("garbage", "invalid_chunk", "undecodable chunk: '{not json'"),
        ("not-a-chunk", "invalid_chunk", "undecodable chunk"),
        ("choices-not-a-list", "invalid_chunk", "undecodable chunk"),
        ("error-inside-stream", "engine_overloaded_error", "overloaded inside the stream"),
        ("no-done", "incomplete_stream", "without [DONE]"),
        ("runaway-line", "invalid_stream", f"longer than {MAX_EVENT_BYTES} bytes"),
    ],
)
def test_broken_streams_end_as_clear_failures(
    gateway: str, node_settings: Settings, model: str, type_: str, says: str
) -> None:
    r = ask(gateway, model)
    assert r.status_code == 502, r.text[:300]
    assert r.json()["error"]["type"] == type_ and says in r.json()["error"]["message"], r.json()
    with Client(settings=node_settings) as client:
        job = client.job(r.headers["x-moonq-job-id"])
        events = list(job.events())
        assert [e.type for e in events if e.type in ("retry", "failed")] == ["retry", "failed"]  # retried once, ended
        assert job.id in [dead["id"] for dead in client.failed()]  # a dead letter, not lost


@pytest.fixture(scope="module")
def runtime(redis_url: str, upstream: str) -> Iterator[tuple[Runtime, Settings]]:
    # In process, no broker: a delivery that raises shows at once instead of after redeliveries.
    settings = make_settings(redis_url, prefix=f"hr{uuid.uuid4().hex[:8]}", moonshot_base_url=upstream, max_attempts=2)
    rt = Runtime(settings).start()
    yield rt, settings
    rt.stop()


# Valid JSON in the wrong shape for a chunk: each ends the job as a StreamInterrupted('invalid_chunk')
# (retried, then failed with that cause), where it once escaped run_job and looped through Celery.
MALFORMED_CHUNKS = [
    "index-not-a-number",  # int("first") in the assembler
    "index-null",  # int(None)
    "delta-not-an-object",  # "just text".items()
    "tool-call-garbage",  # "f".get(...)
    "deep-chunk",  # json.loads: RecursionError
    "deep-delta",  # deeper than readers of the event can parse
]


@pytest.mark.parametrize("model", MALFORMED_CHUNKS)
def test_upstream_shapes_that_break_the_assembler_end_as_invalid_chunk(
    runtime: tuple[Runtime, Settings], model: str
) -> None:
    rt, settings = runtime
    with Client(settings=settings) as client:
        job = client.submit({"model": model, "messages": USER})
        assert rt.submit(json.loads(job.record()["envelope"])).result(timeout=20) == "failed"
        failed = [e for e in job.events() if e.type == "failed"]
        assert failed and failed[0].error is not None and failed[0].error.type == "invalid_chunk"


# --- crafted messages on the queue -------------------------------------------------------------


def queued(r: redis.Redis, settings: Settings) -> int:
    """Messages waiting in the node's queue (every priority list) or delivered but not acknowledged."""
    lists = [k for k in r.scan_iter(f"{settings.keys.broker_prefix}{settings.queue}*") if r.type(k) == b"list"]
    return sum(int(r.llen(k)) for k in lists) + int(r.hlen(f"{settings.keys.broker_prefix}unacked"))


def publish(settings: Settings, body: bytes, content_type: str, task_id: str) -> None:
    """A message as a crafted producer would put it on the queue: Celery's headers, any body."""
    app = producer_app(settings)
    try:
        with app.connection_for_write() as conn, conn.Producer() as producer:
            producer.publish(
                body,
                exchange="",
                routing_key=settings.queue,
                content_type=content_type,
                content_encoding="binary",
                headers={"lang": "py", "task": TASK_NAME, "id": task_id, "argsrepr": "", "kwargsrepr": ""},
            )
    finally:
        app.close()


def send(settings: Settings, args: list[Any], task_id: str) -> None:
    app = producer_app(settings)
    try:
        app.send_task(TASK_NAME, args=args, task_id=task_id, queue=settings.queue)
    finally:
        app.close()


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Payload:
    """Runs code when unpickled (here, harmlessly, a mkdir): what a crafted pickle message would carry."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


def test_task_messages_are_json_only(node_settings: Settings) -> None:
    app, producer = create_app(node_settings), producer_app(node_settings)
    for conf in (app.conf, producer.conf):
        assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert app.control.mailbox.accept == ["json"]  # remote control (broadcasts) too
    app.close()
    producer.close()


def test_a_pickled_message_is_refused_and_runs_no_code(
    node: WorkerProcess, node_settings: Settings, r: redis.Redis, gateway: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    body = pickle.dumps(((Payload(marker),), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}))
    publish(node_settings, body, "application/x-python-serialize", str(uuid.uuid4()))
    assert wait_for(lambda: "Refusing to deserialize untrusted content of type pickle" in node.log())
    assert wait_for(lambda: queued(r, node_settings) == 0)  # consumed and dropped, not left to come back
    assert not marker.exists()
    assert ask(gateway, "ok").json()["choices"][0]["message"]["content"] == "fine"  # the node serves on


def test_a_message_that_is_not_json_is_dropped_with_a_log_line(
    node: WorkerProcess, node_settings: Settings, r: redis.Redis, gateway: str
) -> None:
    publish(node_settings, b'{"not": json', "application/json", str(uuid.uuid4()))
    assert wait_for(lambda: "Can't decode message body" in node.log())
    assert wait_for(lambda: queued(r, node_settings) == 0)
    assert ask(gateway, "ok").status_code == 200


def test_a_job_leaves_the_nodes_line_and_celerys_received_line_but_not_its_success_line(
    node: WorkerProcess, gateway: str
) -> None:
    """Celery's "succeeded in" line says a failed job succeeded and costs CPU per job: off by default
    (MOONQ_CELERY_SUCCESS_LOG); its "received" line, the delivery's record, stays."""
    answer = ask(gateway, "ok")
    assert answer.status_code == 200
    assert wait_for(lambda: "event=job_succeeded" in node.log())
    assert f"Task {TASK_NAME}[" in node.log() and "] received" in node.log()
    assert " succeeded in " not in node.log()


def test_a_task_argument_that_is_not_an_object_is_not_redelivered(
    node: WorkerProcess, node_settings: Settings, r: redis.Redis, gateway: str
) -> None:
    task_id = str(uuid.uuid4())
    send(node_settings, ["not an envelope"], task_id)
    assert wait_for(lambda: f"Task {TASK_NAME}[{task_id}] received" in node.log())
    assert wait_for(lambda: queued(r, node_settings) == 0)
    time.sleep(0.5)  # a requeued message would be delivered again by now
    assert node.log().count(f"Task {TASK_NAME}[{task_id}] received") == 1
    assert ask(gateway, "ok").status_code == 200


def test_a_malformed_envelope_ends_as_a_clear_failure_not_a_redelivery_loop(
    node: WorkerProcess, node_settings: Settings, r: redis.Redis
) -> None:
    # A newer producer's envelope (a field this worker does not know), for a job whose record exists.
    with Client(settings=node_settings) as client:
        job_id = str(uuid.uuid4())
        envelope = JobEnvelope(job_id=job_id, request={"model": "ok", "messages": USER}).model_dump(mode="json")
        r.hset(
            node_settings.keys.job(job_id),
            mapping={"status": "queued", "model": "ok", "seq": 0, "enqueued_at": envelope["enqueued_at"]},
        )
        send(node_settings, [{**envelope, "v": 2, "deadline_s": 30}], job_id)
        ended = wait_for(lambda: client.job(job_id).status() == "failed", timeout_s=3)
        deliveries = len(re.findall(rf"Task {TASK_NAME}\[{job_id}\] received", node.log()))
        assert ended and deliveries == 1, f"status {client.job(job_id).status()}, delivered {deliveries} times"
        error = json.loads(client.job(job_id).record()["error"])
        assert "deadline_s" in error["message"]
        assert job_id in [dead["id"] for dead in client.failed()]
