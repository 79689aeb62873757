"""Idempotency keys: the same key within the retention window returns the same job."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis

from harness import free_port
from moonq.keys import Keys, group_of
from moonq.wire import JobEnvelope
from producers import Client, InvalidRequest
from producers.client import RESEND_AFTER_S, SubmitItem
from tests.helpers import active_count
from worker.settings import Settings

REQ = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Once only."}]}


def queued(r: redis.Redis, settings: Settings) -> int:
    return sum(int(r.llen(k)) for k in r.keys(f"{settings.prefix}:{settings.queue}*"))


def test_same_key_same_job_and_one_message(fresh_prefix: Settings, r: redis.Redis) -> None:
    with Client(settings=fresh_prefix) as client:
        a = client.submit(REQ, idempotency_key="order-42")
        b = client.submit(REQ, idempotency_key="order-42")
        c = client.submit(REQ, idempotency_key="order-43")
    assert a.id == b.id != c.id
    assert queued(r, fresh_prefix) == 2


def test_same_key_with_another_request_is_refused(fresh_prefix: Settings, r: redis.Redis) -> None:
    with Client(settings=fresh_prefix) as client:
        first = client.submit(REQ, idempotency_key="k")
        with pytest.raises(
            InvalidRequest, match=f"idempotency_key: 'k' was used for a different request .job {first.id}"
        ):
            client.submit({**REQ, "temperature": 0.1}, idempotency_key="k")
    assert queued(r, fresh_prefix) == 1


@pytest.mark.parametrize(
    ("key", "age_s"),
    # Long enough ago: sent at once. Just now: waits for the first submitter's send, then sends itself.
    [("crash", 10.0), ("fresh-crash", RESEND_AFTER_S - 0.5)],
)
def test_a_submitter_that_died_before_sending_is_covered(
    fresh_prefix: Settings, r: redis.Redis, key: str, age_s: float
) -> None:
    with Client(settings=fresh_prefix) as client:
        first = client.submit(REQ, idempotency_key=key)
        # As if it had died between recording the job and sending its message, age_s ago.
        r.delete(*r.keys(f"{fresh_prefix.prefix}:{fresh_prefix.queue}*"))
        record = fresh_prefix.keys.job(first.id)
        r.hdel(record, "sent")
        r.hset(record, "enqueued_at", float(r.hget(record, "enqueued_at") or 0) - age_s)
        again = client.submit(REQ, idempotency_key=key)
    assert again.id == first.id and queued(r, fresh_prefix) == 1


def test_keyed_jobs_run_once_end_to_end(run: Any, client: Client) -> None:
    job = run(REQ)  # warm: the worker is up
    a = client.submit(REQ, idempotency_key=f"e2e-{job.id}")
    b = client.submit(REQ, idempotency_key=f"e2e-{job.id}")
    assert a.id == b.id
    result = a.result(timeout=20)
    assert b.result(timeout=1) == result
    assert JobEnvelope.model_validate_json(a.record()["envelope"]).request == REQ


def test_a_refused_send_forgets_the_key_so_a_retry_with_it_runs(fresh_prefix: Settings, r: redis.Redis) -> None:
    """The broker did not take the message: no record, no key, no index entry; the same key then works."""
    dead_broker = fresh_prefix.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    with Client(settings=dead_broker) as refused, pytest.raises(Exception) as caught:  # whatever the transport raises
        refused.submit(REQ, idempotency_key="refused")
    assert not isinstance(caught.value, InvalidRequest)
    keys = fresh_prefix.keys
    assert not r.exists(keys.idempotency("refused")) and not active_count(r, keys)
    assert not r.keys(f"{keys.prefix}:job:*")
    with Client(settings=fresh_prefix) as client:
        job = client.submit(REQ, idempotency_key="refused")
        assert client.submit(REQ, idempotency_key="refused").id == job.id and queued(r, fresh_prefix) == 1


def test_the_key_lives_as_long_as_its_job(run: Any, client: Client, r: redis.Redis) -> None:
    """No TTL while the job is active (however long it waits or runs); the record's TTL once it ended."""
    keys = client.settings.keys
    waiting = Client(settings=client.settings.model_copy(update={"queue": "nobody-consumes-this"}))
    with waiting:
        queued_job = waiting.submit(REQ, idempotency_key="long-wait")
        assert r.ttl(keys.idempotency("long-wait")) == -1 and r.ttl(keys.job(queued_job.id)) == -1
    job = client.submit(REQ, idempotency_key="finished")
    job.result(timeout=20)
    key_ttl, record_ttl = r.ttl(keys.idempotency("finished")), r.ttl(keys.job(job.id))
    assert 0 < key_ttl <= record_ttl <= client.settings.result_ttl_s and record_ttl - key_ttl <= 1


@pytest.mark.parametrize("bad", ["", "x" * 256, 7])
def test_bad_keys_are_rejected(fresh_prefix: Settings, bad: Any) -> None:
    with Client(settings=fresh_prefix) as client, pytest.raises(InvalidRequest, match="idempotency_key"):
        client.submit(REQ, idempotency_key=bad)


def test_cli_idempotency_key(fresh_prefix: Settings) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "REDIS_URL": fresh_prefix.redis_url, "MOONQ_PREFIX": fresh_prefix.prefix}
    cmd = [sys.executable, "-m", "console.cli", "submit", "hi", "--no-wait", "--idempotency-key", "cli-1"]
    ids = [subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30).stdout.strip() for _ in range(2)]
    assert ids[0] and ids[0] == ids[1]


def test_submit_many_with_keys_returns_the_first_jobs(fresh_prefix: Settings, r: redis.Redis) -> None:
    with Client(settings=fresh_prefix) as client:
        before = client.submit(REQ, idempotency_key="b-0")
        items = [SubmitItem(REQ, idempotency_key=f"b-{i}") for i in range(3)]
        jobs = client.submit_many([*items, REQ, SubmitItem(REQ, idempotency_key="b-1")])
        ids = [j.id for j in jobs]
        assert ids[0] == before.id and ids[4] == ids[1] and len(set(ids)) == 4
        assert queued(r, fresh_prefix) == 4  # b-0's message once, b-1's once, b-2 and the keyless one
        again = client.submit_many(items)
        assert [j.id for j in again] == ids[:3] and queued(r, fresh_prefix) == 4
        assert client.submit(REQ, idempotency_key="b-2").id == ids[2]
        # Each keyed job is in its key's group: the key and the record share a slot.
        for i in range(3):
            assert group_of(ids[i]) == Keys.idempotency_group(f"b-{i}")
        assert all(j.record()["sent"] == "1" for j in jobs)


def test_submit_many_refuses_a_key_used_for_another_request(fresh_prefix: Settings, r: redis.Redis) -> None:
    other = {**REQ, "temperature": 0.1}
    with Client(settings=fresh_prefix) as client:
        first = client.submit(REQ, idempotency_key="held")
        with pytest.raises(InvalidRequest, match=f"requests.1.idempotency_key: 'held' was used .* .job {first.id}"):
            client.submit_many([REQ, SubmitItem(other, idempotency_key="held")])
        with pytest.raises(InvalidRequest, match=r"requests\.2\.idempotency_key: 'twice' was used .* \(requests\.0\)"):
            client.submit_many(
                [SubmitItem(REQ, idempotency_key="twice"), REQ, SubmitItem(other, idempotency_key="twice")]
            )
    assert queued(r, fresh_prefix) == 1 and not r.exists(fresh_prefix.keys.idempotency("twice"))


def test_submit_many_covers_a_first_submitter_that_died(fresh_prefix: Settings, r: redis.Redis) -> None:
    with Client(settings=fresh_prefix) as client:
        first = client.submit(REQ, idempotency_key="died")
        r.delete(*r.keys(f"{fresh_prefix.prefix}:{fresh_prefix.queue}*"))
        record = fresh_prefix.keys.job(first.id)
        r.hdel(record, "sent")
        r.hset(record, "enqueued_at", float(r.hget(record, "enqueued_at") or 0) - 10)
        again, _ = client.submit_many([SubmitItem(REQ, idempotency_key="died"), REQ])
    assert again.id == first.id and queued(r, fresh_prefix) == 2


def test_keyed_bulk_jobs_run_once_end_to_end(client: Client, worker: Any) -> None:
    tag = uuid.uuid4().hex
    items = [SubmitItem(REQ, idempotency_key=f"{tag}-{i}") for i in range(5)]
    jobs = client.submit_many(items + items)
    assert [j.id for j in jobs[:5]] == [j.id for j in jobs[5:]]
    assert all(j.result(timeout=30).choices[0].message.content for j in jobs[:5])


def test_submit_many_with_keys_through_a_broker_apart(fresh_prefix: Settings, r: redis.Redis) -> None:
    """The broker named by another URL (the same server here, so its lists can be counted): published
    through Celery and kombu, the same answers."""
    apart = fresh_prefix.model_copy(update={"broker_url": fresh_prefix.redis_url.replace("127.0.0.1", "localhost")})
    assert apart.broker_url != apart.redis_url
    with Client(settings=apart) as client:
        assert client._submitter._direct is None
        first = client.submit(REQ, idempotency_key="apart-0")
        jobs = client.submit_many([SubmitItem(REQ, idempotency_key=f"apart-{i}") for i in (0, 1, 1)] + [REQ])
        assert [j.id for j in jobs][:3] == [first.id, jobs[1].id, jobs[1].id] and len({j.id for j in jobs}) == 3
        assert all(j.record()["sent"] == "1" for j in jobs)
    assert queued(r, fresh_prefix) == 3
