"""Redis Cluster for the data plane: a real three-primary cluster (``redis-cli --cluster create``).

``REDIS_URL=redis+cluster://...`` holds the records, replay logs, shard channels and the limiter;
the Celery broker is a plain Redis of its own (kombu has no cluster transport). Real
``celery -A worker worker`` processes, the simulator over HTTP, and the suite's own end-to-end and
SIGKILL bodies (tests/helpers.py, shared with the Redis and RabbitMQ suites), plus cancel,
metrics, webhooks and the gateway on the cluster.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import GatewaySettings
from harness import RedisServer, WorkerProcess, free_port
from harness.processes import ClusterSet
from moonq.connect import resilient_redis
from moonq.deliveries import backlog
from moonq.keys import GROUP_TAGS, GROUPS
from moonq.redisurl import sync_redis
from producers import AsyncClient, Client
from simulator import SimServer
from tests.helpers import (
    API_KEY,
    assert_one_clean_ending,
    cli_submit_completes,
    make_settings,
    node_env,
    real_celery_worker_process_runs_jobs,
    serve_gateway,
    sigkill_mid_stream_jobs_finish_on_another_node,
    unbounded_keys,
    wait_until,
)
from tests.webhook_receiver import Receiver, serve_receiver
from worker.exporter import RedisCollector
from worker.settings import Settings

REQUEST = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Hello over a cluster"}]}
LONG = {
    "model": "moonshot-v1-8k",
    "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
    "max_completion_tokens": 400,
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSet]:
    with ClusterSet() as c:
        yield c


@pytest.fixture(scope="module")
def broker() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def fresh_prefix(cluster: ClusterSet, broker: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """An empty keyspace on the cluster, and a queue of its own on the broker (both read from the
    environment, as the nodes started by the test inherit it)."""
    tag = uuid.uuid4().hex[:8]
    monkeypatch.setenv("CELERY_BROKER_URL", broker.url)
    monkeypatch.setenv("MOONQ_QUEUE", f"q{tag}")
    settings = make_settings(cluster.url, prefix=f"c{tag}")
    assert settings.broker_url == broker.url and settings.redis_url == cluster.url
    return settings


@pytest.fixture
def node(fresh_prefix: Settings, sim: SimServer) -> Iterator[WorkerProcess]:
    with WorkerProcess(node_env(fresh_prefix, sim.base_url)) as proc:
        yield proc


def shard_keys(cluster: ClusterSet, pattern: str) -> list[int]:
    """How many keys match ``pattern`` on each primary."""
    counts = []
    for port in cluster.ports:
        r = redis.Redis(port=port)
        counts.append(sum(1 for _ in r.scan_iter(match=pattern, count=1000)))
        r.close()
    return counts


def test_end_to_end_on_a_cluster(node: WorkerProcess, fresh_prefix: Settings, cluster: ClusterSet) -> None:
    real_celery_worker_process_runs_jobs(node, fresh_prefix)
    with Client(settings=fresh_prefix) as client:
        jobs = [client.submit(REQUEST) for _ in range(24)]
        for job in jobs:
            assert_one_clean_ending(list(job.events()))
        bulk = client.submit_many([REQUEST] * 20, priority=0)
        assert all(j.result(timeout=20).choices[0].message.content for j in bulk)
        first = client.submit(REQUEST, idempotency_key="order-42")
        assert client.submit(REQUEST, idempotency_key="order-42").id == first.id
        assert first.result(timeout=20).choices[0].message.content
    # Every job's keys in its group's slot, and the groups spread over all three primaries.
    assert all(n > 0 for n in shard_keys(cluster, f"{fresh_prefix.prefix}:job:*"))

    async def follow() -> list[str]:
        async with AsyncClient(settings=fresh_prefix) as aclient:
            ajobs = [await aclient.submit(REQUEST, priority=9) for _ in range(6)]
            return [(await asyncio.wait_for(_types(j), 20))[-1] for j in ajobs]

    assert asyncio.run(follow()) == ["completed"] * 6
    cli_submit_completes(fresh_prefix)
    log = node.log()
    assert "heartbeat failed" not in log and "Traceback" not in log and API_KEY not in log
    r = sync_redis(fresh_prefix.redis_url)
    assert unbounded_keys(r, fresh_prefix.prefix) == []
    r.close()


async def _types(job: Any) -> list[str]:
    return [e.type async for e in job.events()]


def test_events_go_to_the_jobs_shard_only(fresh_prefix: Settings, cluster: ClusterSet, sim: SimServer) -> None:
    """A fragment is SPUBLISHed on the shard that holds its job: a shard subscriber there hears it,
    a plain subscriber on every node hears nothing (a PUBLISH would have reached them all)."""
    with Client(settings=fresh_prefix) as client:
        job = client.submit(REQUEST)  # no node yet: queued
        channel = fresh_prefix.keys.events(job.id)
        owner = client.redis.get_node_from_key(channel)  # type: ignore[attr-defined]
        shard = redis.Redis(host=owner.host, port=owner.port).pubsub()
        shard.ssubscribe(channel)
        plain = [redis.Redis(port=port).pubsub() for port in cluster.ports]
        for p in plain:
            p.subscribe(channel)
        with WorkerProcess(node_env(fresh_prefix, sim.base_url)):
            assert job.result(timeout=20).choices[0].message.content
        heard = _drain(shard)
        assert next(m["type"] for m in heard) == "ssubscribe" and any(m["type"] == "smessage" for m in heard)
        assert json.loads([m for m in heard if m["type"] == "smessage"][-1]["data"])["type"] == "completed"
        assert all(m["type"] == "subscribe" for p in plain for m in _drain(p))
        for p in [shard, *plain]:
            p.close()


def _drain(pubsub: Any) -> list[dict[str, Any]]:
    out = []
    while (msg := pubsub.get_message(timeout=0.2)) is not None:
        out.append(msg)
    return out


def test_cancel_on_a_cluster(fresh_prefix: Settings, slow_sim: SimServer) -> None:
    with Client(settings=fresh_prefix) as client:
        queued = client.submit(REQUEST)  # no node yet
        assert queued.cancel() is True and queued.status() == "cancelled"
        assert [e.type for e in queued.events()] == ["cancelled"]
        with WorkerProcess(node_env(fresh_prefix, slow_sim.base_url)):
            job = client.submit(LONG)
            events = job.events()
            assert next(events).type == "delta"  # streaming on the node
            asked = time.monotonic()
            assert job.cancel() is True
            rest = list(events)
            assert rest[-1].type == "cancelled" and [e for e in rest if e.terminal] == [rest[-1]]
            assert time.monotonic() - asked < 2.0
            assert job.status() == "cancelled"


def test_sigkill_mid_job_on_a_cluster(fresh_prefix: Settings, slow_sim: SimServer) -> None:
    # The broker's visibility timeout brings the dead node's messages back; the survivor takes the jobs
    # over once their heartbeats (on the cluster) go stale, with one worker_lost retry each.
    sigkill_mid_stream_jobs_finish_on_another_node(fresh_prefix, slow_sim)


def test_metrics_on_a_cluster(fresh_prefix: Settings, sim: SimServer) -> None:
    port = free_port()
    env = node_env(fresh_prefix, sim.base_url, MOONQ_METRICS_PORT=str(port))
    with WorkerProcess(env), Client(settings=fresh_prefix) as client:
        jobs = [client.submit(REQUEST) for _ in range(5)]
        assert all(j.result(timeout=20).choices[0].message.content for j in jobs)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    done = [
        s for s in families["moonq_jobs"].samples if s.name == "moonq_jobs_total" and s.labels["outcome"] == "succeeded"
    ]
    assert sum(s.value for s in done) == 5
    tokens = [s for s in families["moonq_tokens"].samples if s.name == "moonq_tokens_total"]
    assert sum(s.value for s in tokens if s.labels["type"] == "completion") > 0
    # The Redis-side gauges read on the scrape: limiter, Redis memory (every primary's), deliveries, queue depth.
    assert families["moonq_redis_memory_bytes"].samples[0].value > 0
    assert {s.labels["state"] for s in families["moonq_webhook_backlog"].samples} == {"queued", "retrying", "dead"}
    assert families["moonq_queue_depth"].samples[0].value == 0
    assert "moonq_ratelimit_cooldown_seconds" in families
    collector = RedisCollector(fresh_prefix)
    try:
        assert {f.name for f in collector.collect()} >= {"moonq_queue_depth", "moonq_webhook_backlog"}
    finally:
        collector.depth.close()
        collector.redis.close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as rx:
        yield rx


def test_webhooks_are_delivered_on_a_cluster(fresh_prefix: Settings, sim: SimServer, receiver: Receiver) -> None:
    """The hand-off streams are one per group, polled on a cluster (worker/deliveries.py)."""
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    env = node_env(
        fresh_prefix,
        sim.base_url,
        MOONQ_WEBHOOK_SECRET=secret,
        MOONQ_WEBHOOK_ALLOW="localhost",
        MOONQ_WEBHOOK_BACKOFF_BASE_S="0.2",
        MOONQ_WEBHOOK_BACKOFF_MAX_S="1",
    )
    name = f"c{uuid.uuid4().hex[:6]}"
    with WorkerProcess(env), Client(settings=fresh_prefix) as client:
        jobs = [client.submit(REQUEST, webhook=receiver.script(name, 500)) for _ in range(8)]
        got = receiver.wait_for(name, 9, timeout_s=30)  # one refused, then each job's once
        ids = {json.loads(g.body)["data"]["id"] for g in got}
        assert ids == {j.id for j in jobs}
        wait_until(lambda: backlog(client.redis, client.keys) == {"queued": 0, "retrying": 0, "dead": 0}, 10, "settled")
    assert len(GROUPS) == 16


def test_the_gateway_streams_on_a_cluster(fresh_prefix: Settings, sim: SimServer) -> None:
    gateway = GatewaySettings(redis_url=fresh_prefix.redis_url, prefix=fresh_prefix.prefix, gateway_tokens="gw-token")
    body = {**REQUEST, "stream": True}
    with WorkerProcess(node_env(fresh_prefix, sim.base_url)), serve_gateway(gateway) as url:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer gw-token"}, timeout=30
        ) as resp:
            assert resp.status_code == 200
            lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert text


def test_a_burst_past_the_connection_bound_waits_its_turn(cluster: ClusterSet) -> None:
    """redis-py's cluster client fails a command past ``max_connections`` at once; the nodes' client waits."""

    async def burst() -> list[Any]:
        client = resilient_redis(cluster.url, max_connections=4)
        try:
            key = f"burst{uuid.uuid4().hex[:6]}"
            # BLPOPs hold their connections 0.1 s each: 20 at once, on one node, through a bound of 4.
            waits = [client.blpop([f"{key}:{{{GROUP_TAGS[0]}}}"], timeout=0.1) for _ in range(20)]
            async with client.pipeline(transaction=False) as pipe:
                for g in GROUPS:
                    pipe.set(f"{key}:{{{GROUP_TAGS[g]}}}", g)
                piped = pipe.execute()
                return await asyncio.gather(*waits, piped)
        finally:
            await client.aclose()

    replies = asyncio.run(burst())
    assert replies[:20] == [None] * 20 and replies[20] == [True] * 16


def test_many_first_commands_at_once_on_a_fresh_client(cluster: ClusterSet) -> None:
    """redis-py's cluster client initialized itself inside each of many concurrent first commands and
    dropped connections the others were writing on; the nodes' client initializes once, first."""

    async def first_contact() -> list[Any]:
        client = resilient_redis(cluster.url, max_connections=50)
        try:
            key = f"first{uuid.uuid4().hex[:6]}"
            return await asyncio.gather(*(client.set(f"{key}:{i}", i) for i in range(200)))
        finally:
            await client.aclose()

    for _ in range(3):
        assert asyncio.run(first_contact()) == [True] * 200
