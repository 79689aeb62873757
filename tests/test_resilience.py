"""Nothing lost, nothing doubled: real worker processes killed, stopped and cut off from Redis mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import pytest

from harness import RedisServer, WorkerProcess
from moonq.eventlog import read_log
from producers import AsyncClient, Client
from simulator import SimServer
from tests.helpers import (
    LONG,
    a_job_longer_than_the_visibility_timeout_is_not_run_twice,
    assert_one_clean_ending,
    make_settings,
    node_env,
    sigkill_mid_stream_jobs_finish_on_another_node,
    streaming,
    wait_until,
)
from worker.settings import Settings


def test_sigkill_mid_stream_jobs_finish_on_another_node(fresh_prefix: Settings, slow_sim: SimServer) -> None:
    sigkill_mid_stream_jobs_finish_on_another_node(fresh_prefix, slow_sim)


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
    a_job_longer_than_the_visibility_timeout_is_not_run_twice(fresh_prefix)


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
