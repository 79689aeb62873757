"""submit_many: all validated before anything is enqueued, then pipelined."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from producers import Client, InvalidRequest
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
