"""The runner driven directly (no Celery): cancel, redelivery of an ended job, upstream auth errors."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from producers import Client, InvalidRequest, JobCancelled
from simulator import SimConfig, SimServer
from tests.helpers import API_KEY, make_settings
from worker.loop import Runtime
from worker.settings import Settings

USER = {"role": "user", "content": "Tell me a long story about the sea."}


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[SimServer]:
    with SimServer(SimConfig(seed=3, chunk_interval_s=0.05)) as server:
        yield server


def runtime(fresh_prefix: Settings, base_url: str, key: str | None = API_KEY, **overrides: Any) -> Runtime:
    settings = make_settings(
        fresh_prefix.redis_url,
        prefix=fresh_prefix.prefix,
        moonshot_base_url=base_url,
        moonshot_api_key=key,
        **overrides,
    )
    return Runtime(settings).start()


def envelope(client: Client, job_id: str) -> dict[str, Any]:
    return json.loads(client.job(job_id).record()["envelope"])  # type: ignore[no-any-return]


def test_cancel_aborts_a_running_stream_within_a_second(fresh_prefix: Settings, slow_sim: SimServer) -> None:
    rt = runtime(fresh_prefix, slow_sim.base_url)
    try:
        with Client(settings=fresh_prefix) as client:
            job = client.submit({"model": "moonshot-v1-8k", "messages": [USER], "max_completion_tokens": 400})
            future = rt.submit(envelope(client, job.id))
            events = job.events()
            first = next(events)
            assert first.type == "delta"  # streaming has started
            asked = time.monotonic()
            assert job.cancel() is True
            assert future.result(timeout=5) == "cancelled"
            elapsed = time.monotonic() - asked
            rest = list(events)
            assert rest[-1].type == "cancelled" and [e for e in rest if e.terminal] == [rest[-1]]
            assert elapsed < 1.0
            assert job.status() == "cancelled"
            with pytest.raises(JobCancelled):
                job.result(timeout=1)
            assert job.cancel() is False  # already ended
    finally:
        rt.stop()


def test_cancel_of_a_queued_job_is_immediate_and_the_delivery_is_skipped(
    fresh_prefix: Settings, sim: SimServer
) -> None:
    rt = runtime(fresh_prefix, sim.base_url)
    try:
        with Client(settings=fresh_prefix) as client:
            job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
            assert job.cancel() is True
            assert job.status() == "cancelled"
            assert [e.type for e in job.events()] == ["cancelled"]
            assert rt.run(envelope(client, job.id)) == "skipped"
            assert [e.type for e in job.events()] == ["cancelled"]
    finally:
        rt.stop()


def test_a_redelivered_finished_job_runs_no_second_time(fresh_prefix: Settings, sim: SimServer) -> None:
    rt = runtime(fresh_prefix, sim.base_url)
    try:
        with Client(settings=fresh_prefix) as client:
            job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
            env = envelope(client, job.id)
            assert rt.run(env) == "succeeded"
            events = list(job.events())
            assert rt.run(env) == "skipped"  # at-least-once delivery: the duplicate is a no-op
            assert list(job.events()) == events
            assert job.record()["attempt"] == "1"
    finally:
        rt.stop()


@pytest.mark.parametrize(
    ("key", "error_type"),
    [(None, "invalid_authentication_error"), ("not-a-key", "incorrect_api_key_error")],
)
def test_upstream_auth_errors_fail_the_job(
    fresh_prefix: Settings, sim: SimServer, key: str | None, error_type: str
) -> None:
    rt = runtime(fresh_prefix, sim.base_url, key)
    try:
        with Client(settings=fresh_prefix) as client:
            job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
            assert rt.run(envelope(client, job.id)) == "failed"
            error = list(job.events())[-1].error
            assert error is not None and (error.status, error.type) == (401, error_type)
    finally:
        rt.stop()


def test_unreachable_upstream_fails_with_a_connection_error(fresh_prefix: Settings) -> None:
    from harness import free_port

    rt = runtime(fresh_prefix, f"http://127.0.0.1:{free_port()}/v1", max_attempts=3)
    try:
        with Client(settings=fresh_prefix) as client:
            job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
            assert rt.run(envelope(client, job.id)) == "failed"
            events = list(job.events())
            assert [(e.type, e.attempt, e.reason) for e in events[:-1]] == [
                ("retry", 2, "connection_error"),
                ("retry", 3, "connection_error"),
            ]
            assert events[-1].error is not None and events[-1].error.type == "connection_error"
            assert job.record()["attempt"] == "3"
    finally:
        rt.stop()


def test_jobs_waiting_for_capacity_start_in_priority_order(fresh_prefix: Settings, slow_sim: SimServer) -> None:
    rt = runtime(fresh_prefix, slow_sim.base_url, max_inflight=1)
    short = {"model": "moonshot-v1-8k", "messages": [USER], "max_completion_tokens": 5}
    try:
        with Client(settings=fresh_prefix) as client:
            blocker = client.submit(short)
            first = rt.submit(envelope(client, blocker.id))
            next(blocker.events())  # it holds the only slot
            jobs = [(p, client.submit(short, priority=p)) for p in (9, 5, 0, 3)]
            futures = [rt.submit(envelope(client, job.id)) for _, job in jobs]
            assert first.result(timeout=10) == "succeeded"
            assert [f.result(timeout=20) for f in futures] == ["succeeded"] * 4
            finished = sorted(jobs, key=lambda pj: float(pj[1].record()["finished_at"]))
            assert [p for p, _ in finished] == [0, 3, 5, 9]
    finally:
        rt.stop()


def test_priority_is_validated_before_enqueueing(fresh_prefix: Settings, r: Any) -> None:
    with Client(settings=fresh_prefix) as client:
        for bad in (-1, 10, "high", True):
            with pytest.raises(InvalidRequest, match="priority: must be an integer from 0"):
                client.submit({"model": "m", "messages": [USER]}, priority=bad)  # type: ignore[arg-type]
    assert r.keys(f"{fresh_prefix.prefix}:*") == []


def test_delta_body_is_event_body_without_the_model() -> None:
    from moonq.eventlog import delta_body, event_body

    delta = {"content": 'héllo "world"', "tool_calls": [{"index": 0, "id": "t1"}]}
    fast, slow = (
        json.loads(delta_body("j", 2, 1, delta)),
        json.loads(event_body("j", "delta", attempt=2, index=1, delta=delta)),
    )
    assert abs(fast.pop("ts") - slow.pop("ts")) < 1.0
    assert list(fast) == list(slow) and fast == slow
