"""Idempotency keys: the same key within the retention window returns the same job."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from harness import free_port
from moonq.wire import JobEnvelope
from producers import Client, InvalidRequest
from producers.client import RESEND_AFTER_S
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
