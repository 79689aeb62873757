"""One pub/sub connection per client: sync followers and waiters in many threads share it.

Against a real redis-server: the client's connections are named (``client_name`` in its URL) so
``CLIENT LIST TYPE pubsub`` counts exactly theirs. A follower whose shared connection is cut, or
whose Redis restarts, refills from the replay log and gets every event once.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import redis

from harness import RedisServer, WorkerProcess
from moonq.settings import ClientSettings
from moonq.wire import ChatCompletion, Event
from producers import AsyncClient, Client, Job, JobCancelled
from simulator import SimServer
from tests.helpers import LONG, make_settings, node_env, wait_until
from worker.settings import Settings

log = logging.getLogger(__name__)

REQ = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Share, please."}], "stream": True}


def named(settings: Settings | ClientSettings) -> tuple[ClientSettings, str]:
    """``settings`` with a client name of its own in the Redis URL (the broker keeps the plain URL)."""
    name = f"sdk-{uuid.uuid4().hex[:8]}"
    url = f"{settings.redis_url}?client_name={name}"
    return ClientSettings(redis_url=url, broker_url=settings.redis_url, prefix=settings.prefix), name


def pubsub_connections(r: redis.Redis, name: str) -> list[dict[str, Any]]:
    return [c for c in r.client_list(_type="pubsub") if c.get("name") == name]


def in_threads(targets: Sequence[Callable[[], Any]]) -> tuple[list[threading.Thread], list[Any]]:
    """Start one thread per target; ``results[i]`` gets its return value or the exception it raised."""
    results: list[Any] = [None] * len(targets)

    def run(i: int, target: Callable[[], Any]) -> None:
        try:
            results[i] = target()
        except Exception as exc:
            log.exception("thread %d raised", i)  # the traceback, in the failing test's report
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, t), daemon=True) for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    return threads, results


def event_types(job: Job) -> list[str]:
    return [e.type for e in job.events()]


def collect(job: Job, poll_s: float, into: list[Event]) -> list[Event]:
    """Follow ``job``, appending each event to ``into`` as it comes (so others can see how far it got)."""
    for event in job.events(poll_s=poll_s):
        into.append(event)
    return into


def test_forty_followers_and_forty_waiters_in_threads_share_one_connection(fresh_prefix: Settings, r: Any) -> None:
    """Queued jobs nobody runs: every thread waits until they are cancelled, all on one connection."""
    settings, name = named(fresh_prefix)
    with Client(settings=settings) as client:
        jobs = client.submit_many([REQ] * 40)
        follow = [functools.partial(event_types, job) for job in jobs]
        wait = [functools.partial(job.result, timeout=30) for job in jobs]
        threads, results = in_threads([*follow, *wait])
        wait_until(lambda: client.fanout.channels == 40, 10, "every job's channel watched")
        wait_until(lambda: any(int(c["sub"]) == 40 for c in pubsub_connections(r, name)), 10, "40 subscriptions")
        assert len(pubsub_connections(r, name)) == 1  # 80 threads, one pub/sub connection
        started = time.monotonic()
        for job in jobs:
            assert job.cancel() is True
        for t in threads:
            t.join(30)
        # Woken by the live event, not by a poll.
        assert time.monotonic() - started < 10
        assert results[:40] == [["cancelled"]] * 40
        assert all(isinstance(x, JobCancelled) for x in results[40:]), results[40:]
        assert client.fanout.channels == 0  # every watch given back
        wait_until(lambda: not any(int(c["sub"]) for c in pubsub_connections(r, name)), 10, "all unsubscribed")


def test_forty_sync_followers_of_running_jobs(settings: Settings, worker: Any, r: Any) -> None:
    """Real jobs on the embedded worker: each follower gets its whole stream once, then its result."""
    named_settings, name = named(settings)
    with Client(settings=named_settings) as client:
        jobs = client.submit_many([REQ] * 40)
        all_in = threading.Barrier(len(jobs) + 1, timeout=30)
        counted = threading.Event()

        def follow(job: Job) -> tuple[list[Event], ChatCompletion]:
            events = []
            for event in job.events():
                events.append(event)
                if len(events) == 1:  # every follower holds its watch until the connections are counted
                    all_in.wait()
                    counted.wait(30)
            return events, job.result(timeout=10)

        threads, results = in_threads([functools.partial(follow, job) for job in jobs])
        all_in.wait()
        wait_until(lambda: any(int(c["sub"]) == 40 for c in pubsub_connections(r, name)), 10, "40 subscriptions")
        assert len(pubsub_connections(r, name)) == 1
        counted.set()
        for t in threads:
            t.join(60)
    for outcome in results:
        assert not isinstance(outcome, BaseException), outcome
        events, result = outcome
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert events[-1].type == "completed"
        text = "".join((e.delta or {}).get("content") or "" for e in events if e.type == "delta")
        assert text == result.choices[0].message.content


def _event(job_id: str, seq: int, type: str, **fields: Any) -> str:
    return json.dumps({"seq": seq, "job_id": job_id, "type": type, "ts": time.time(), **fields})


def _follow_sync(settings: ClientSettings, job_id: str, seen: list[Event]) -> None:
    with Client(settings=settings) as client:
        seen.extend(client.job(job_id).events(poll_s=30))


def _follow_async(settings: ClientSettings, job_id: str, seen: list[Event]) -> None:
    async def main() -> None:
        async with AsyncClient(settings=settings) as client:
            async for event in client.job(job_id).events(poll_s=30):
                seen.append(event)

    asyncio.run(main())


@pytest.mark.parametrize("follow", [_follow_sync, _follow_async], ids=["sync", "async"])
def test_after_a_reconnect_the_follower_refills_from_the_log(
    fresh_prefix: Settings, r: Any, follow: Callable[[ClientSettings, str, list[Event]], None]
) -> None:
    """Events written while the connection is cut never arrive live; the resubscription reads them.

    The follower's quiet poll is 30 s, so only the reconnect can bring them in time.
    """
    settings, name = named(fresh_prefix)
    keys = settings.keys
    with Client(settings=fresh_prefix) as writer:
        job = writer.submit(REQ)  # nobody consumes this prefix: we play the worker
    seen: list[Event] = []
    follower = threading.Thread(target=follow, args=(settings, job.id, seen), daemon=True)
    follower.start()
    wait_until(lambda: any(int(c["sub"]) == 1 for c in pubsub_connections(r, name)), 10, "the subscription")
    time.sleep(0.3)  # the confirmation's log read is done
    for seq in (1, 2):  # in the log, never published: as if lost while the connection was down
        body = _event(job.id, seq, "delta", attempt=1, index=0, delta={"content": "x"})
        r.xadd(keys.log(job.id), {"e": body}, id=f"{seq}-0")
    time.sleep(0.3)
    assert seen == []  # nothing tells the follower yet
    started = time.monotonic()
    [victim] = pubsub_connections(r, name)
    r.client_kill_filter(_id=victim["id"])
    wait_until(lambda: len(seen) == 2, 10, "the log read after the reconnect")
    assert time.monotonic() - started < 10
    final = _event(job.id, 3, "cancelled")
    r.xadd(keys.log(job.id), {"e": final}, id="3-0")
    r.publish(keys.events(job.id), final)
    follower.join(10)
    assert [(e.seq, e.type) for e in seen] == [(1, "delta"), (2, "delta"), (3, "cancelled")]


def test_sync_followers_ride_out_a_redis_restart(slow_sim: SimServer) -> None:
    """Sync followers in threads on one client, across a Redis restart: every event once, in order."""
    with RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "always")) as server:
        plain = make_settings(server.url)
        settings, _ = named(plain)
        with WorkerProcess(node_env(plain, slow_sim.base_url)), Client(settings=settings) as client:
            jobs = client.submit_many([LONG] * 4)
            wait_until(lambda: all(int(j.record()["seq"]) > 0 for j in jobs), 20, "jobs streaming")
            seen: list[list[Event]] = [[] for _ in jobs]
            follow = [functools.partial(collect, job, 0.5, into) for job, into in zip(jobs, seen, strict=True)]
            wait = [functools.partial(job.result, timeout=60) for job in jobs]
            threads, results = in_threads([*follow, *wait])
            wait_until(lambda: all(seen), 10, "every follower on its stream")
            server.restart(down_s=1.0)
            for t in threads:
                t.join(60)
            for job, events, result in zip(jobs, results[:4], results[4:], strict=True):
                assert not isinstance(events, BaseException), events
                assert not isinstance(result, BaseException), result
                logged = list(job.events())
                assert [e.seq for e in events] == [e.seq for e in logged] == list(range(1, len(logged) + 1))
                assert [e.type for e in events if e.terminal] == ["completed"]


def test_more_threads_than_connections_wait_for_one_instead_of_failing(settings: Settings, worker: Any) -> None:
    """300 threads replay finished jobs' logs at once through one client: its pool holds 100 connections
    (``SYNC_MAX_CONNECTIONS``); redis-py's default pool fails past its bound, the client's waits."""
    with Client(settings=settings) as client:
        jobs = client.submit_many([{"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "hi"}]}] * 6)
        for job in jobs:
            job.result(timeout=20)
        errors: list[BaseException] = []
        done: list[int] = []

        def replay(job: Any) -> None:
            try:
                done.append(len(list(client.job(job.id).events())))
            except BaseException as err:  # every failure is the finding
                errors.append(err)

        threads = [threading.Thread(target=replay, args=(jobs[i % 6],)) for i in range(300)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert errors == [] and len(done) == 300 and min(done) >= 2
