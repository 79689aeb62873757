"""Every fault kind, end to end through the simulator: each job reaches the right single outcome."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import wait
from typing import Any

import pytest

from moonq.wire import Event
from producers import Client, JobFailed
from simulator import SimConfig, SimServer
from tests.helpers import make_settings
from worker.loop import Runtime
from worker.settings import Settings

USER = [{"role": "user", "content": "Say something about faults."}]


def scripted(*script: str, model: str = "moonshot-v1-8k") -> dict[str, Any]:
    # Unknown fields pass through the queue untouched; the simulator reads this one.
    return {"model": model, "messages": USER, "sim": {"script": list(script), "key": uuid.uuid4().hex}}


def one_ending(events: list[Event]) -> Event:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    endings = [e for e in events if e.terminal]
    assert len(endings) == 1 and events[-1] is endings[0]
    return endings[0]


def retries(events: list[Event]) -> list[tuple[int | None, str | None]]:
    return [(e.attempt, e.reason) for e in events if e.type == "retry"]


def text_after_last_retry(events: list[Event]) -> str:
    # A retry that resumes (Partial Mode, issue 14) keeps the deltas before it; one that restarts does not.
    start = max((i for i, e in enumerate(events) if e.type == "retry" and not e.resume), default=-1) + 1
    return "".join((e.delta or {}).get("content") or "" for e in events[start:] if e.type == "delta")


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("overload", "engine_overloaded_error"),
        ("rate_limit:1", "rate_limit_reached_error"),
        ("server_error", "server_error"),
        ("unavailable", "upstream_error"),
        ("drop", "connection_dropped"),
        ("truncate", "incomplete_stream"),
        ("no_finish", "incomplete_stream"),
        ("corrupt", "invalid_chunk"),
    ],
)
def test_transient_fault_is_retried_to_success(run: Any, fault: str, reason: str) -> None:
    job = run(scripted(fault, "ok"))
    events: list[Event] = job.collected
    assert one_ending(events).type == "completed"
    assert retries(events) == [(2, reason)]
    # Deltas of an abandoned attempt are superseded, those of a resumed one stand: they spell the answer.
    assert text_after_last_retry(events) == job.result(timeout=5).choices[0].message.content
    assert job.record()["attempt"] == "2"


def test_moonshots_delay_in_the_message_is_honoured(run: Any) -> None:
    events = run(scripted("rate_limit:1", "ok")).collected
    (retry,) = [e for e in events if e.type == "retry"]
    assert retry.delay_s == 1.0


def test_slow_first_token_is_not_a_fault(run: Any) -> None:
    events = run(scripted("slow_first:0.3")).collected
    assert one_ending(events).type == "completed" and not retries(events)


@pytest.mark.parametrize(
    ("request_", "status", "type_"),
    [
        (scripted("quota"), 429, "exceeded_current_quota_error"),
        # Over the context window: a 400 only the upstream can give (per-model rules are checked at submit).
        ({"model": "moonshot-v1-8k", "messages": USER, "max_completion_tokens": 8190}, 400, "invalid_request_error"),
        ({"model": "no-such-model", "messages": USER}, 404, "resource_not_found_error"),
    ],
    ids=["quota", "400", "404"],
)
def test_final_errors_are_never_retried(run: Any, request_: dict[str, Any], status: int, type_: str) -> None:
    events = run(request_).collected
    ending = one_ending(events)
    assert ending.type == "failed" and not retries(events)
    assert ending.error is not None and (ending.error.status, ending.error.type) == (status, type_)


def test_exhausted_budget_fails_with_the_last_error_and_becomes_a_dead_letter(
    fresh_prefix: Settings, sim: SimServer
) -> None:
    settings = make_settings(
        fresh_prefix.redis_url, prefix=fresh_prefix.prefix, moonshot_base_url=sim.base_url, max_attempts=3
    )
    rt = Runtime(settings).start()
    try:
        with Client(settings=fresh_prefix) as client:
            job = client.submit(scripted("overload", "server_error", "drop", "ok"))
            assert rt.run(json.loads(job.record()["envelope"])) == "failed"
            events = list(job.events())
            ending = one_ending(events)
            assert retries(events) == [(2, "engine_overloaded_error"), (3, "server_error")]
            assert ending.error is not None and ending.error.type == "connection_dropped"
            with pytest.raises(JobFailed) as info:
                job.result(timeout=1)
            assert info.value.error["type"] == "connection_dropped"
            (dead,) = client.failed()
            assert dead["id"] == job.id and dead["attempts"] == 3 and dead["error"]["type"] == "connection_dropped"
            # Re-run it: a new job with the same request; the script's next entry is "ok".
            again = client.retry(job.id)
            assert again.record()["retry_of"] == job.id
            assert rt.run(json.loads(again.record()["envelope"])) == "succeeded"
            assert client.failed() == []
            assert job.status() == "failed"  # the old job keeps its one ending
    finally:
        rt.stop()


def test_stalled_stream_hits_the_read_timeout_and_is_retried(fresh_prefix: Settings, sim: SimServer) -> None:
    settings = make_settings(
        fresh_prefix.redis_url, prefix=fresh_prefix.prefix, moonshot_base_url=sim.base_url, read_timeout_s=0.3
    )
    rt = Runtime(settings).start()
    try:
        with Client(settings=fresh_prefix) as client:
            job = client.submit(scripted("stall:2", "ok"))
            assert rt.run(json.loads(job.record()["envelope"])) == "succeeded"
            assert retries(list(job.events())) == [(2, "timeout")]
    finally:
        rt.stop()


def test_an_upstream_that_never_answers_hits_the_read_timeout(fresh_prefix: Settings) -> None:
    """No headers at all (a hung proxy): the wait for them is bounded by the read timeout too."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the kernel's backlog), never answers
        base_url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        settings = make_settings(
            fresh_prefix.redis_url,
            prefix=fresh_prefix.prefix,
            moonshot_base_url=base_url,
            read_timeout_s=0.3,
            max_attempts=2,
            backoff_base_s=0.0,
        )
        rt = Runtime(settings).start()
        try:
            with Client(settings=fresh_prefix) as client:
                job = client.submit({"model": "moonshot-v1-8k", "messages": USER})
                started = time.monotonic()
                assert rt.run(json.loads(job.record()["envelope"])) == "failed"
                assert time.monotonic() - started < 5
                events = list(job.events())
                assert retries(events) == [(2, "timeout")]
                assert one_ending(events).error.type == "timeout"  # type: ignore[union-attr]
        finally:
            rt.stop()


@pytest.fixture(scope="module")
def faulty_sim() -> Iterator[SimServer]:
    with SimServer(SimConfig(seed=11, fault_rate=0.35)) as server:
        yield server


def test_every_job_survives_a_35_percent_transient_fault_rate(fresh_prefix: Settings, faulty_sim: SimServer) -> None:
    settings = make_settings(fresh_prefix.redis_url, prefix=fresh_prefix.prefix, moonshot_base_url=faulty_sim.base_url)
    rt = Runtime(settings).start()
    try:
        with Client(settings=fresh_prefix) as client:
            jobs = [
                client.submit({"model": "moonshot-v1-8k", "messages": USER, "n": 1, "seed_hint": i}) for i in range(60)
            ]
            futures = [rt.submit(json.loads(job.record()["envelope"])) for job in jobs]
            wait(futures, timeout=50)
            assert [f.result() for f in futures] == ["succeeded"] * len(jobs)
            endings = [one_ending(list(job.events())) for job in jobs]
            assert all(e.type == "completed" for e in endings)
        stats = faulty_sim.stats()
        assert sum(stats["by_fault"].values()) > 10  # the faults really happened
    finally:
        rt.stop()
