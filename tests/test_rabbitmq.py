"""A broker apart from ``REDIS_URL``: RabbitMQ (``CELERY_BROKER_URL=amqp://…``), and another Redis.

Redis (``REDIS_URL``) still holds the records, events, limiter and node list. A private RabbitMQ
node (conftest's ``rabbitmq``) and real ``celery -A worker worker`` processes. The end-to-end and
SIGKILL tests are the Redis suite's own bodies (tests/helpers.py, shared with tests/test_processes.py
and tests/test_resilience.py), run here under settings whose broker is RabbitMQ: ``fresh_prefix``
below puts the broker URL and a queue of the test's own into the environment, where ``Settings``
and the worker processes (which inherit it) read them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu.connection import Connection

from harness import RabbitMQServer, RedisServer, WorkerProcess
from moonq.broker import AMQP_MAX_PRIORITY, QueueDepth, amqp_queue, broker_config, message_priority
from producers import AsyncClient, Client
from simulator import SimServer
from tests.helpers import (
    a_job_longer_than_the_visibility_timeout_is_not_run_twice,
    cli_submit_completes,
    make_settings,
    node_env,
    real_celery_worker_process_runs_jobs,
    sigkill_mid_stream_jobs_finish_on_another_node,
)
from worker.app import celery_config
from worker.exporter import RedisCollector
from worker.settings import Settings

REQUEST = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Hello over AMQP"}]}


@pytest.fixture
def fresh_prefix(rabbitmq: RabbitMQServer, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """conftest's ``fresh_prefix`` on RabbitMQ: an empty keyspace and a queue nobody else consumes."""
    tag = uuid.uuid4().hex[:8]
    monkeypatch.setenv("CELERY_BROKER_URL", rabbitmq.url)
    monkeypatch.setenv("MOONQ_QUEUE", f"q{tag}")
    settings = make_settings(redis_url, prefix=f"t{tag}")
    assert settings.broker_url == rabbitmq.url and settings.queue == f"q{tag}"
    return settings


@pytest.fixture
def node(fresh_prefix: Settings, sim: SimServer) -> Iterator[WorkerProcess]:
    # Fast heartbeats, so the job heartbeats (keepalive.py) run while the jobs do.
    with WorkerProcess(node_env(fresh_prefix, sim.base_url)) as proc:
        yield proc


def test_end_to_end_on_rabbitmq(node: WorkerProcess, fresh_prefix: Settings) -> None:
    real_celery_worker_process_runs_jobs(node, fresh_prefix)
    with Client(settings=fresh_prefix) as client:
        # Live events, and the bulk path (kombu's batch falls back to one publish per message).
        job = client.submit(REQUEST)
        events = list(job.events())
        assert events[-1].type == "completed" and [e.seq for e in events] == list(range(1, len(events) + 1))
        bulk = client.submit_many([REQUEST] * 20, priority=0)
        assert all(j.result(timeout=20).choices[0].message.content for j in bulk)

    async def follow() -> list[str]:
        async with AsyncClient(settings=fresh_prefix) as aclient:
            ajob = await aclient.submit(REQUEST, priority=9)
            return [e.type async for e in ajob.events()]

    assert asyncio.run(follow())[-1] == "completed"
    cli_submit_completes(fresh_prefix)
    log = node.log()
    assert "transport:   amqp://guest:**@127.0.0.1" in log  # Celery's banner: the broker, password masked
    assert "heartbeat failed" not in log and "Traceback" not in log


def test_sigkill_mid_job_on_rabbitmq(fresh_prefix: Settings, slow_sim: SimServer) -> None:
    # RabbitMQ requeues the dead node's deliveries when its connection drops; the survivor takes the
    # jobs over once their heartbeats go stale (1.5 s here), with a worker_lost retry event.
    sigkill_mid_stream_jobs_finish_on_another_node(fresh_prefix, slow_sim)


def test_priorities_and_queue_depth_on_rabbitmq(fresh_prefix: Settings) -> None:
    with Client(settings=fresh_prefix) as client:
        by_priority = {p: client.submit(REQUEST, priority=p).id for p in (9, 5, 0, 7, 2)}
        bulk = [j.id for j in client.submit_many([REQUEST] * 3, priority=1)]
    # Publisher confirms: every submit that returned is in the queue, counted by a passive declare.
    depth = QueueDepth(fresh_prefix)
    assert depth.read() == 8
    assert scrape(fresh_prefix)["moonq_queue_depth"].samples[0].value == 8
    # RabbitMQ hands them out most urgent first (moonq's 0 is AMQP's 9), FIFO within a level.
    delivered = []
    with Connection(fresh_prefix.broker_url) as conn:
        queue = amqp_queue(fresh_prefix)(conn.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            delivered.append((message.headers["id"], message.properties["priority"]))
    p = by_priority
    assert [job_id for job_id, _ in delivered] == [p[0], *bulk, p[2], p[5], p[7], p[9]]
    assert [pri for _, pri in delivered] == [9, 8, 8, 8, 7, 4, 2, 0]
    assert depth.read() == 0
    depth.close()


def test_broker_settings_per_scheme(fresh_prefix: Settings) -> None:
    amqp = celery_config(fresh_prefix)
    # One queue declaration, the same for producers and workers, with the priority argument.
    assert broker_config(fresh_prefix)["task_queues"][0].queue_arguments == {"x-max-priority": AMQP_MAX_PRIORITY}
    assert amqp["task_queues"][0].consumer_arguments == {"x-consumer-timeout": 24 * 3600 * 1000}
    # The Redis-only parts stay out: no custom transport, no visibility timeout, no key prefix.
    assert "broker_transport" not in amqp and amqp["broker_transport_options"] == {"confirm_publish": True}
    assert [message_priority(fresh_prefix, p) for p in (0, 5, 9)] == [9, 4, 0]
    on_redis = make_settings(fresh_prefix.redis_url, broker_url=fresh_prefix.redis_url)
    redis_conf = celery_config(on_redis)
    assert redis_conf["broker_transport"] == "worker.transport:Transport" and "task_queues" not in redis_conf
    assert redis_conf["broker_transport_options"]["visibility_timeout"] == on_redis.visibility_timeout_s
    assert [message_priority(on_redis, p) for p in (0, 5, 9)] == [0, 5, 9]


def test_queue_depth_is_absent_when_the_broker_does_not_answer(redis_url: str) -> None:
    from harness import free_port

    settings = make_settings(redis_url, broker_url=f"amqp://guest:guest@127.0.0.1:{free_port()}//")
    families = scrape(settings)
    assert "moonq_queue_depth" not in families and "moonq_ratelimit_cooldown_seconds" in families


def scrape(settings: Settings) -> dict[str, Any]:
    """The families the node's Redis/broker collector yields, by name (its connections closed after)."""
    collector = RedisCollector(settings)
    try:
        return {f.name: f for f in collector.collect()}
    finally:
        collector.depth.close()
        collector.redis.close()


def test_a_long_job_on_a_separate_redis_broker_is_not_run_twice(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The broker's unacked index lives in the broker's Redis: keepalive.py must beat it there, or a job
    # longer than the visibility timeout (3 s here) would be delivered again to the other node.
    with RedisServer() as broker:
        monkeypatch.setenv("CELERY_BROKER_URL", broker.url)
        settings = make_settings(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
        assert settings.broker_url == broker.url != settings.redis_url
        a_job_longer_than_the_visibility_timeout_is_not_run_twice(settings)
