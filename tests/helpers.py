"""What the tests share that is not a fixture: plain names and functions, imported like any module.

conftest.py holds the fixtures and hooks only, and builds them from these; test modules import
from here, never from conftest or from each other. The shared test bodies at the end are run by
the Redis suite (tests/test_processes.py, tests/test_resilience.py) and again on RabbitMQ
(tests/test_rabbitmq.py); they are not named ``test_*`` so pytest collects them once, through
the tests that call them.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.asyncio import Redis

from gateway.app import GatewaySettings, create_app
from harness import WorkerProcess
from moonq.keys import GROUPS, Keys
from moonq.wire import Event
from producers import Client
from simulator import SimConfig, SimServer
from simulator.server import serve_in_thread
from worker.limiter_state import LimiterKeys
from worker.ratelimit import Limiter, Limits
from worker.settings import Settings

API_KEY = "sk-moonq-test-0123456789abcdef"

# Delays shrunk so retries and liveness play out in test time; the logic is the production logic.
FAST: dict[str, Any] = {
    "backoff_base_s": 0.01,
    "max_retry_delay_s": 0.05,
    "heartbeat_interval_s": 0.5,
    "heartbeat_stale_s": 1.5,
    "visibility_timeout_s": 3.0,
    "lease_ttl_s": 3.0,
    "read_timeout_s": 10.0,
    "attempt_timeout_s": 30.0,
    "metrics_port": 0,  # tests that scrape pick a free port
}

# About 4 s per answer: 80 tokens, one per chunk, 50 ms apart (conftest's ``slow_sim`` serves it).
SLOW_SIM = SimConfig(seed=5, chunk_interval_s=0.05, tokens_per_chunk=1, answer_tokens=(80, 80))

LONG = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "A long answer, please."}]}


def make_settings(redis_url: str, **overrides: Any) -> Settings:
    """Worker settings on ``redis_url`` with the test API key and the ``FAST`` delays; ``overrides`` win.

    An embedded runtime delivers webhooks on its own loop: one delivery process per test's runtime
    would cost a process start each (real nodes, ``node_env``, run theirs in a child process).
    """
    defaults = {"redis_url": redis_url, "moonshot_api_key": API_KEY, "webhook_process": False, **FAST}
    return Settings(**{**defaults, **overrides})


def node_env(settings: Settings, base_url: str, **extra: str) -> dict[str, str]:
    """Environment for a real worker process under ``settings``' Redis and prefix, with fast liveness."""
    env = {
        "REDIS_URL": settings.redis_url,
        "MOONQ_PREFIX": settings.prefix,
        "MOONSHOT_BASE_URL": base_url,
        "MOONSHOT_API_KEY": API_KEY,
    }
    env.update({f"MOONQ_{k.upper()}": str(v) for k, v in FAST.items()})
    return {**env, **extra}


def nested(depth: int, leaf: Any = None) -> Any:
    """``leaf`` inside ``depth`` levels of JSON containers, dicts and lists alternating."""
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@contextmanager
def serve_gateway(settings: GatewaySettings) -> Iterator[str]:
    """The gateway on a free port, served by uvicorn in a thread, as users run it; yields its base URL."""
    with serve_in_thread(create_app(settings), lifespan=True) as url:
        yield url


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Polls ``predicate`` every 50 ms; AssertionError naming ``what`` after ``timeout_s``."""
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


# --- test bodies shared by the Redis and RabbitMQ suites ---------------------------------------


def real_celery_worker_process_runs_jobs(node: WorkerProcess, settings: Settings) -> None:
    """``node`` (a ``celery -A worker worker`` process on ``settings``) completes jobs, with the default pool."""
    user = {"role": "user", "content": "Hello from a real worker process"}
    with Client(settings=settings) as client:
        jobs = [client.submit({"model": "kimi-k2-turbo-preview", "messages": [user]}) for _ in range(5)]
        results = [job.result(timeout=20) for job in jobs]
    assert all(r.choices[0].finish_reason == "stop" and r.choices[0].message.content for r in results)
    log = node.log()
    # The defaults users get with no flags: the thread pool at moonq's concurrency, JSON only.
    assert "concurrency: 1000 (thread)" in log
    assert API_KEY not in log


def sigkill_mid_stream_jobs_finish_on_another_node(settings: Settings, slow_sim: SimServer) -> None:
    """Three ~4 s streams; their node is SIGKILLed mid-stream, and a second node finishes them (one retry each)."""
    env = node_env(settings, slow_sim.base_url)
    with Client(settings=settings) as client, WorkerProcess(env) as doomed:
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
    # Fast liveness settings: visibility 3 s. Production defaults are checked in test_resilience's slow test.
    assert recovered_s < 20


def a_job_longer_than_the_visibility_timeout_is_not_run_twice(settings: Settings) -> None:
    """A ~6 s stream under a 3 s visibility timeout, two nodes on one queue: delivered and run once."""
    with SimServer(SimConfig(seed=6, chunk_interval_s=0.05, tokens_per_chunk=1, answer_tokens=(120, 120))) as sim:
        env = node_env(settings, sim.base_url)
        with Client(settings=settings) as client, WorkerProcess(env) as a, WorkerProcess(env) as b:
            job = client.submit(LONG)
            job.result(timeout=30)
            events = list(job.events())
            assert_one_clean_ending(events)
            assert not [e for e in events if e.type == "retry"]
            assert job.record()["attempt"] == "1"
            time.sleep(4)  # past another visibility timeout: still no second delivery
            assert (a.log() + b.log()).count(f"run_job[{job.id}] received") == 1


# ---- the key census: every key has a TTL or a named owner (tests/test_bounded.py, the nemesis) ----

# Keys without a TTL that are allowed, because an owner removes what it puts there. Pattern (after
# the prefix) -> why it stays bounded. Everything else must carry a TTL.
OWNED = {
    # kombu's Redis transport: the queue and its in-flight bookkeeping.
    "moonq": "the job queue (priority 0 list): consumers pop it; an empty list no longer exists",
    "moonq\x06\x16*": "the job queue's priority 1-9 lists: as above",
    "unacked": "kombu's delivered-but-unacked messages: one entry per running job, deleted at its ack",
    "unacked_index": "delivery tag -> last beat of the same messages: deleted at ack, restored after the"
    " visibility timeout if the node died",
    # kombu's routing tables; kombu never gives them a TTL (a volatile-* eviction policy must not drop them).
    "_kombu.binding.*": "exchange -> queue bindings: one member per queue; members of auto-delete queues (pidbox,"
    " gossip, replies) leave with their consumer, expiring ones are swept via _kombu.binding_deadlines",
    "_kombu.binding_permanent.*": "the bindings of queues declared without x-expires: one member per queue",
    "_kombu.binding_deadlines": "exchange -> deadline of expiring binding tables; kombu sweeps overdue ones",
    # The fleet limiter (worker/ratelimit.py): members carry their own expiry as the score.
    "{limit}:inflight": "leased in-flight slots: released when the call ends; a dead holder's lease is"
    " dropped by the next acquire once its score (expiry) passes",
    "{limit}:waiters": "jobs waiting for capacity, by rank: removed when granted; a dead process's by the next acquire",
    "{limit}:alive": "the waiters' liveness deadlines: removed with them",
    # Jobs that have not ended (moonq/keys.py): the index owns their records, logs and idempotency keys.
    "active:{*}": "job id -> last sign of life of every active job: removed by the write that ends it; the"
    " sweeper re-sends or forgets what stays silent",
    # Webhooks and Celery callbacks owed by ended jobs (moonq/deliveries.py, worker/deliveries.py).
    "deliveries:{*}": "the hand-off stream: each entry is deleted when a node settles it (delivered, retry"
    " scheduled, or dead letter); consumers of dead nodes are removed from its group by the live ones",
    "deliveries:due:{*}": "delivery id -> when its retry is due: each leaves as it goes back into the stream",
    # The web console (gateway/console/session.py): one key for the deployment's life.
    "console:session_key": "the console's session-signing key: 32 bytes, made once (SET NX), never more than one",
}


def owned_reason(prefix: str, key: str) -> str | None:
    name = key.removeprefix(f"{prefix}:")
    return next((why for pattern, why in OWNED.items() if fnmatch.fnmatchcase(name, pattern)), None)


def unbounded_keys(r: redis.Redis, prefix: str) -> list[str]:
    """Keys with neither a TTL nor an owner in ``OWNED``, or outside the prefix (described)."""
    bad = []
    for raw in r.scan_iter(count=1000):
        key = raw.decode(errors="replace")
        ttl = r.pttl(raw)
        if ttl == -2:  # gone since the scan (expired, acked)
            continue
        if not key.startswith(f"{prefix}:"):
            bad.append(f"{key!r}: outside the prefix {prefix!r}")
        elif ttl == -1 and owned_reason(prefix, key) is None:
            bad.append(f"{key!r} ({r.type(raw)!r}): no TTL and no owner")
    return bad


# ---- the fleet limiter, several Limiter instances standing in for several processes ----


def run_limiters(redis_url: str, body: Callable[[Callable[..., Limiter]], Awaitable[Any]]) -> Any:
    """Run ``body`` with a factory of started limiters sharing one fresh prefix; stop them all after."""

    async def main() -> Any:
        redis = Redis.from_url(redis_url)
        prefix = f"rl{uuid.uuid4().hex[:8]}"
        made: list[Limiter] = []

        def limiter(limits: Limits, **kw: Any) -> Limiter:
            lim = Limiter(redis, prefix, limits, **kw)
            lim.start()
            made.append(lim)
            return lim

        channel, done = LimiterKeys.for_prefix(prefix).wake, asyncio.Event()
        listener = asyncio.create_task(_wake_limiters(redis, channel, made, done))
        try:
            return await asyncio.wait_for(body(limiter), timeout=30)
        finally:
            # Ended by a flag and a message, and awaited, so its pub/sub connection is closed here (a
            # cancel alone can be lost inside redis-py, and an unclosed socket fails a later test).
            done.set()
            await redis.publish(channel, "done")
            await asyncio.wait([listener], timeout=5)
            listener.cancel()
            for lim in made:
                await lim.stop()
            await redis.aclose()

    return asyncio.run(main())


async def _wake_limiters(redis: Redis, channel: str, limiters: list[Limiter], done: asyncio.Event) -> None:
    # What the runtime's listener does for its process's limiter.
    async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(channel)
        async for _ in pubsub.listen():
            if done.is_set():
                return
            for lim in limiters:
                lim.wake()


def active_count(r: redis.Redis, keys: Keys) -> int:
    """Jobs in the active indexes of every group (moonq/keys.py)."""
    return sum(int(r.zcard(keys.active_in(g))) for g in GROUPS)


def cli_submit_completes(settings: Settings) -> None:
    """``moonq submit`` (the CLI, configured by the environment alone: its broker too) runs a job to ``completed``."""
    env = {**os.environ, "REDIS_URL": settings.redis_url, "MOONQ_PREFIX": settings.prefix}
    done = subprocess.run(
        [sys.executable, "-m", "console.cli", "submit", "Say hi", "--model", "moonshot-v1-8k", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["type"] == "completed"
