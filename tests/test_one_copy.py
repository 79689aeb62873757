"""One copy of each request in Redis: the job's record holds it, the broker message does not."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import redis

from harness import WorkerProcess
from moonq.broker import queue_lists
from producers import AsyncClient, Client
from simulator import SimServer
from tests.helpers import node_env
from worker.settings import Settings

IMAGE = "data:image/png;base64," + base64.b64encode(bytes(range(256)) * 4096).decode()  # ~1.4 MB of base64


def big_request() -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": "What is this?"}]
    return {"model": "moonshot-v1-8k-vision-preview", "messages": [{"role": "user", "content": content}]}


def queued_messages(r: redis.Redis, settings: Settings) -> list[list[Any]]:
    """The Celery bodies (``[args, kwargs, embed]``) of the messages waiting in the queue lists."""
    out = []
    for name in queue_lists(settings):
        for raw in r.lrange(name, 0, -1):
            payload = json.loads(raw)
            out.append(json.loads(base64.b64decode(payload["body"])))
    return out


def test_the_message_carries_the_jobs_id_not_its_request(r: redis.Redis, fresh_prefix: Settings) -> None:
    with Client(settings=fresh_prefix) as client:  # nobody consumes this prefix's queue: the message stays
        job = client.submit(big_request(), priority=3)
    [body] = queued_messages(r, fresh_prefix)
    args = body[0][0]
    assert args["job_id"] == job.id and args["priority"] == 3 and "request" not in args
    assert args["enqueued_at"] == json.loads(job.record()["envelope"])["enqueued_at"]
    # The request's bytes are in Redis once: the record, not the queue. (The record's allocation is
    # rounded up to jemalloc's size class: 1.5 MiB for these 1.4 MB.)
    assert len(r.hget(fresh_prefix.keys.job(job.id), "envelope") or b"") < 1.001 * len(json.dumps(big_request()))
    record = r.memory_usage(fresh_prefix.keys.job(job.id), samples=0) or 0
    queue = sum(r.memory_usage(name, samples=0) or 0 for name in queue_lists(fresh_prefix) if r.exists(name))
    assert record < 1.2 * len(json.dumps(big_request())) and queue < 4096


def test_a_job_sent_as_a_ticket_runs_from_its_record(fresh_prefix: Settings, sim: SimServer) -> None:
    with Client(settings=fresh_prefix) as client, WorkerProcess(node_env(fresh_prefix, sim.base_url)):
        job = client.submit(big_request())
        result = job.result(timeout=30)
        assert result.choices[0].message.content and job.record()["attempt"] == "1"


def test_a_record_whose_envelope_is_unreadable_fails_the_job(fresh_prefix: Settings, sim: SimServer) -> None:
    with Client(settings=fresh_prefix) as client:
        job = client.submit({"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "hi"}]})
        client.redis.hset(fresh_prefix.keys.job(job.id), "envelope", '{"not": "an envelope"}')
        with WorkerProcess(node_env(fresh_prefix, sim.base_url)):
            events = list(job.events())
        assert events[-1].type == "failed" and events[-1].error is not None
        assert events[-1].error.type == "invalid_envelope" and "envelope" in events[-1].error.message


def test_following_a_job_does_not_read_its_request(r: redis.Redis, fresh_prefix: Settings, sim: SimServer) -> None:
    # A follower checks that the job exists (and is its tenant's) before it subscribes: two fields, not the
    # record's 1.4 MB copy of the request, for each of the many followers a gateway serves.
    def sent_bytes() -> int:
        return int(r.info("stats")["total_net_output_bytes"])

    with Client(settings=fresh_prefix) as client, WorkerProcess(node_env(fresh_prefix, sim.base_url)):
        job = client.submit(big_request())
        job.result(timeout=30)
        before = sent_bytes()
        events = list(job.events())
        sync_read = sent_bytes() - before

        async def follow() -> list[Any]:
            async with AsyncClient(settings=fresh_prefix) as aio:
                return [event async for event in aio.job(job.id).events()]

        before = sent_bytes()
        aio_events = asyncio.run(follow())
        async_read = sent_bytes() - before
    assert events[-1].type == aio_events[-1].type == "completed"
    assert sync_read < 100_000 and async_read < 100_000, (sync_read, async_read)
