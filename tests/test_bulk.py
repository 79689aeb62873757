"""submit_many: all validated before anything is enqueued, then pipelined."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
import redis

from moonq.broker import send_envelope
from moonq.wire import JobEnvelope, JobTicket
from producers import AsyncClient, Client, InvalidRequest
from producers.client import SubmitItem
from tests.helpers import active_count
from worker.settings import Settings

REQ = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "In bulk."}]}


def test_one_bad_request_enqueues_nothing_and_is_named(fresh_prefix: Settings, r: redis.Redis) -> None:
    bad = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": ""}]}
    with Client(settings=fresh_prefix) as client, pytest.raises(InvalidRequest) as info:
        client.submit_many([REQ, REQ, bad, REQ])
    assert "requests.2.messages.0.content: must not be empty" in str(info.value)
    assert r.keys(f"{fresh_prefix.prefix}:*") == []


def test_bulk_jobs_are_queued_with_records_and_priority(fresh_prefix: Settings, r: redis.Redis) -> None:
    with Client(settings=fresh_prefix) as client:
        jobs = client.submit_many([REQ] * 2500, priority=2)
        assert len({j.id for j in jobs}) == 2500
        assert all(j.status() == "queued" for j in jobs[::250])
    # kombu's priority list for 2 (the bare queue name is priority 0).
    assert r.llen(f"{fresh_prefix.prefix}:{fresh_prefix.queue}\x06\x162") == 2500


def test_bulk_jobs_run(client: Client, worker: Any) -> None:
    jobs = client.submit_many([REQ] * 20)
    assert all(j.result(timeout=30).choices[0].message.content for j in jobs)


def test_prompts_stay_out_of_celery_headers(fresh_prefix: Settings, r: redis.Redis) -> None:
    secret = "my private prompt text"
    with Client(settings=fresh_prefix) as client:
        job = client.submit({"model": "m", "messages": [{"role": "user", "content": secret}]})
    (raw,) = r.lrange(f"{fresh_prefix.prefix}:{fresh_prefix.queue}\x06\x165", 0, -1)
    headers = json.loads(raw)["headers"]
    assert job.id in headers["argsrepr"]
    assert secret not in json.dumps(headers)


def test_a_pushed_message_is_the_one_celery_would_send(fresh_prefix: Settings, r: redis.Redis) -> None:
    """The broker is the data Redis: the message is pushed with the record; it reads as Celery's own."""
    with Client(settings=fresh_prefix) as client:
        assert client._submitter._direct is not None
        job = client.submit(REQ, priority=3)
        pushed_list = f"{fresh_prefix.prefix}:{fresh_prefix.queue}\x06\x163"
        (pushed,) = r.lrange(pushed_list, 0, -1)
        r.delete(pushed_list)
        envelope = JobEnvelope.model_validate_json(job.record()["envelope"])
        send_envelope(client._submitter._celery, fresh_prefix, envelope)
        (sent,) = r.lrange(pushed_list, 0, -1)
        assert job.record()["sent"] == "1"
    ours, celery = json.loads(pushed), json.loads(sent)
    assert ours.keys() == celery.keys() and ours["headers"] == celery["headers"]
    unique = {"delivery_tag"}  # one per message
    assert {k: v for k, v in ours["properties"].items() if k not in unique} == {
        k: v for k, v in celery["properties"].items() if k not in unique
    }
    assert ours["properties"]["delivery_tag"] != celery["properties"]["delivery_tag"]
    body = lambda m: json.loads(base64.b64decode(m["body"]))  # noqa: E731
    assert body(ours) == body(celery) == [[JobTicket.of(envelope).model_dump(mode="json")], {}, body(celery)[2]]


def test_submit_items_carry_their_own_options(fresh_prefix: Settings, r: redis.Redis) -> None:
    with Client(settings=fresh_prefix) as client:
        jobs = client.submit_many(
            [REQ, SubmitItem(REQ, priority=1, webhook="https://example.com/hook"), SubmitItem(REQ)], priority=4
        )
        records = [j.record() for j in jobs]
    assert [rec["priority"] for rec in records] == ["4", "1", "4"]
    assert "webhook" in records[1] and "webhook" not in records[0]
    assert all(rec["sent"] == "1" for rec in records)
    base = f"{fresh_prefix.prefix}:{fresh_prefix.queue}\x06\x16"
    assert (r.llen(f"{base}4"), r.llen(f"{base}1")) == (2, 1)
    with Client(settings=fresh_prefix) as client, pytest.raises(InvalidRequest, match=r"requests\.1\.priority"):
        client.submit_many([REQ, SubmitItem(REQ, priority=12)])


@pytest.mark.parametrize("how", ["one", "bulk", "async"])
def test_a_refused_push_forgets_the_jobs(fresh_prefix: Settings, r: redis.Redis, how: str) -> None:
    """A push the broker list refuses (here: the list's name holds a string) leaves no record or index entry."""
    r.set(f"{fresh_prefix.prefix}:{fresh_prefix.queue}\x06\x165", "not a list")

    async def submit_async() -> None:
        async with AsyncClient(settings=fresh_prefix) as aio:  # its submit pushes from its own loop
            await aio.submit(REQ)

    with Client(settings=fresh_prefix) as client, pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        if how == "bulk":
            client.submit_many([REQ, SubmitItem(REQ, idempotency_key="refused")])
        elif how == "async":
            asyncio.run(submit_async())
        else:
            client.submit(REQ)
    assert not r.keys(f"{fresh_prefix.prefix}:job:*") and not active_count(r, fresh_prefix.keys)
    assert not r.exists(fresh_prefix.keys.idempotency("refused"))


@pytest.mark.parametrize("how", ["one", "bulk"])
def test_a_redis_out_of_memory_refuses_the_whole_enqueue(fresh_prefix: Settings, r: redis.Redis, how: str) -> None:
    """The enqueue is one script call: a Redis above maxmemory refuses it before any write."""
    with Client(settings=fresh_prefix) as client:
        client.submit(REQ)  # scripts loaded, connections open
        before = r.dbsize()
        r.config_set("maxmemory", 1)
        try:
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                client.submit_many([REQ] * 3) if how == "bulk" else client.submit(REQ)
        finally:
            r.config_set("maxmemory", 0)
        assert r.dbsize() == before
