"""Nothing lost, nothing doubled: real worker processes killed, stopped and cut off from Redis mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from harness import RedisServer, WorkerProcess
from moonq.eventlog import read_log
from moonq.wire import Event
from producers import AsyncClient, Client
from simulator import SimConfig, SimServer
from tests.conftest import make_settings, node_env
from worker.settings import Settings

LONG = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "A long answer, please."}]}


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[SimServer]:
    # About 4 s per answer: 80 tokens, one per chunk, 50 ms apart.
    with SimServer(SimConfig(seed=5, chunk_interval_s=0.05, tokens_per_chunk=1, answer_tokens=(80, 80))) as server:
        yield server


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def streaming(client: Client, job_ids: list[str]) -> bool:
    """Every job has relayed at least one delta."""
    return all(int(client.job(j).record().get("seq", 0)) > 0 for j in job_ids)


def assert_one_clean_ending(events: list[Event], outcome: str = "completed") -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in events if e.terminal] == [outcome]
    assert events[-1].type == outcome


def test_sigkill_mid_stream_jobs_finish_on_another_node(fresh_prefix: Settings, slow_sim: SimServer) -> None:
    env = node_env(fresh_prefix, slow_sim.base_url)
    with Client(settings=fresh_prefix) as client, WorkerProcess(env) as doomed:
        jobs = [client.submit(LONG) for _ in range(3)]
        ids = [j.id for j in jobs]
        wait_until(lambda: streaming(client, ids), 20, "all jobs streaming on the first node")
        assert doomed.proc is not None
        os.kill(doomed.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with WorkerProcess(env):
            results = [job.result(timeout=60) for job in jobs]
            recovered_s = time.monotonic() - killed_at
        for job, result in zip(jobs, results, strict=True):
            events = list(job.events())
            assert_one_clean_ending(events)
            retries = [e for e in events if e.type == "retry"]
            assert [(e.reason, e.attempt) for e in retries] == [("worker_lost", 2)]
            # The deltas after the retry event are the whole answer of attempt 2.
            after = events[events.index(retries[0]) + 1 :]
            text = "".join((e.delta or {}).get("content") or "" for e in after if e.type == "delta")
            assert text == result.choices[0].message.content
            assert job.record()["attempt"] == "2"
    # Fast liveness settings: visibility 3 s. Production defaults are checked in the slow test below.
    assert recovered_s < 20


def test_sigterm_hands_running_jobs_back_at_once(fresh_prefix: Settings, slow_sim: SimServer) -> None:
    env = node_env(fresh_prefix, slow_sim.base_url)
    with Client(settings=fresh_prefix) as client:
        first = WorkerProcess(env).start()
        jobs = [client.submit(LONG) for _ in range(2)]
        wait_until(lambda: streaming(client, [j.id for j in jobs]), 20, "jobs streaming")
        t0 = time.monotonic()
        assert first.stop(timeout_s=20) == 0
        stopped_s = time.monotonic() - t0
        assert stopped_s < 3.0  # did not wait for the ~4 s streams to finish
        for job in jobs:
            assert job.status() == "queued"
            assert read_log(client.redis, client.keys, job.id)[-1].reason == "worker_shutdown"
        with WorkerProcess(env):
            for job in jobs:
                job.result(timeout=30)
                events = list(job.events())
                assert_one_clean_ending(events)
                assert [(e.reason, e.attempt) for e in events if e.type == "retry"] == [("worker_shutdown", 2)]


def test_a_job_longer_than_the_visibility_timeout_is_not_run_twice(fresh_prefix: Settings) -> None:
    # 3 s visibility timeout, a ~6 s stream, two nodes watching the same queue.
    with SimServer(SimConfig(seed=6, chunk_interval_s=0.05, tokens_per_chunk=1, answer_tokens=(120, 120))) as sim:
        env = node_env(fresh_prefix, sim.base_url)
        with Client(settings=fresh_prefix) as client, WorkerProcess(env) as a, WorkerProcess(env) as b:
            job = client.submit(LONG)
            job.result(timeout=30)
            events = list(job.events())
            assert_one_clean_ending(events)
            assert not [e for e in events if e.type == "retry"]
            assert job.record()["attempt"] == "1"
            time.sleep(4)  # past another visibility timeout: still no second delivery
            assert (a.log() + b.log()).count(f"run_job[{job.id}] received") == 1


def test_redis_restart_mid_stream(slow_sim: SimServer) -> None:
    with RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "always")) as server:
        settings = make_settings(server.url)
        env = node_env(settings, slow_sim.base_url)
        with WorkerProcess(env) as node, Client(settings=settings) as client:
            jobs = [client.submit(LONG) for _ in range(4)]
            wait_until(lambda: streaming(client, [j.id for j in jobs]), 20, "jobs streaming")
            # An AsyncClient follower rides the restart too (its one shared pub/sub connection drops).
            followed: list[Any] = []

            async def follow() -> None:
                async with AsyncClient(settings=settings) as aclient:
                    followed.extend([e async for e in aclient.job(jobs[0].id).events(poll_s=0.5)])

            follower = threading.Thread(target=asyncio.run, args=(follow(),))
            follower.start()
            server.restart(down_s=1.0)
            for job in jobs:
                job.result(timeout=60)
                assert_one_clean_ending(list(job.events()))
            follower.join(timeout=30)
            assert [e.seq for e in followed] == [e.seq for e in jobs[0].events()]  # nothing lost, nothing twice
            # The node carries on taking new work after the restart.
            assert client.submit(LONG).result(timeout=30).choices[0].message.content
            assert node.proc is not None and node.proc.poll() is None


@pytest.mark.slow
def test_sigkill_recovery_within_30s_on_default_settings(fresh_prefix: Settings, slow_sim: SimServer) -> None:
    env = {
        "REDIS_URL": fresh_prefix.redis_url,
        "MOONQ_PREFIX": fresh_prefix.prefix,
        "MOONSHOT_BASE_URL": slow_sim.base_url,
        "MOONSHOT_API_KEY": "sk-test",
    }
    with Client(settings=fresh_prefix) as client, WorkerProcess(env) as doomed:
        job = client.submit(LONG)
        wait_until(lambda: streaming(client, [job.id]), 20, "streaming")
        assert doomed.proc is not None
        os.kill(doomed.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with WorkerProcess(env):
            wait_until(lambda: job.record()["attempt"] == "2", 40, "the job to start again")
            restarted_s = time.monotonic() - killed_at
            job.result(timeout=30)
    assert restarted_s < 30
