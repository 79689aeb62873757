"""The sweeper (worker/sweeper.py): active jobs left with no message and no live owner are sent again."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from kombu.connection import Connection

from harness import WorkerProcess
from moonq.broker import broker_config, producer_app, queue_for, queue_lists, send_envelope
from moonq.record import DEFAULT_TENANT, JobField, JobRecord, JobStatus
from moonq.wire import JobEnvelope
from producers import Client
from simulator import SimServer
from tests.helpers import make_settings, node_env
from worker import transport
from worker.loop import connect
from worker.settings import Settings
from worker.sweeper import BATCH, Sweeper, message_enqueued_at, verdict

USER = {"role": "user", "content": "Hello there."}


def rec(status: str, **fields: str) -> JobRecord:
    record = JobRecord.from_redis({"status": status, **fields})
    assert record is not None
    return record


@pytest.mark.parametrize(
    ("record", "oldest", "expected"),
    [
        (None, math.inf, "forget"),
        (rec("succeeded"), math.inf, "forget"),
        (rec("cancelled"), None, "forget"),
        # The producer died between recording and sending.
        (rec("queued", enqueued_at="100"), None, "send"),
        # Sent: still in the queue while a message as old as it is there.
        (rec("queued", sent="1", enqueued_at="100"), 90.0, "wait"),
        (rec("queued", sent="1", enqueued_at="100"), 100.0, "wait"),
        (rec("queued", sent="1", enqueued_at="100"), 101.0, "send"),
        (rec("queued", sent="1", enqueued_at="100"), math.inf, "send"),
        # A broker that cannot be looked into (RabbitMQ) keeps its messages: trust it.
        (rec("queued", sent="1", enqueued_at="100"), None, "wait"),
        # Running: the heartbeat decides (now 1000 s, orphan after 60 s).
        (rec("running", heartbeat_at=str(950_000)), None, "wait"),
        (rec("running", heartbeat_at=str(900_000)), None, "send"),
        (rec("retrying", heartbeat_at=str(900_000)), math.inf, "send"),
        (rec("running"), None, "send"),
    ],
)
def test_verdict(record: JobRecord | None, oldest: float | None, expected: str) -> None:
    assert verdict(record, now_s=1000.0, orphan_after_s=60.0, oldest_queued_s=oldest) == expected


def test_message_enqueued_at_reads_a_real_kombu_message(fresh_prefix: Settings, r: redis.Redis) -> None:
    envelope = JobEnvelope(job_id="j1", request={"model": "m", "messages": []}, enqueued_at=1234.5)
    app = producer_app(fresh_prefix)
    try:
        send_envelope(app, fresh_prefix, envelope)
    finally:
        app.close()
    tails = [r.lindex(name, -1) for name in queue_lists(fresh_prefix)]
    [raw] = [t for t in tails if t is not None]
    assert message_enqueued_at(raw) == 1234.5
    assert message_enqueued_at(b"not json") is None


class Sweeps:
    """One node's sweeps, in turn (what a sweep suspects is looked at again by the next one)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.suspects: set[str] = set()

    def __call__(self) -> int:
        async def once() -> int:
            client = connect(self.settings)
            try:
                sweeper = Sweeper(self.settings, client)
                sweeper.suspects = self.suspects
                sent = await sweeper.sweep()
                self.suspects = sweeper.suspects
                return sent
            finally:
                await client.aclose()

        return asyncio.run(once())


def _age(r: redis.Redis, settings: Settings, job_id: str) -> None:
    """The job showed no sign of life for longer than ``orphan_after_s``."""
    r.zadd(settings.keys.active_for(job_id), {job_id: 0})


@contextmanager
def node(settings: Settings, base_url: str) -> Iterator[None]:
    """A node consuming the settings' queue: ``celery -A worker worker``, as users start it.

    A process of its own: a second embedded Celery worker in the test process would stop the session's
    one when it stops (Celery keeps its stop flags in module globals).
    """
    with WorkerProcess(node_env(settings, base_url)):
        yield


@pytest.fixture
def swept(fresh_prefix: Settings, sim: SimServer) -> Settings:
    return make_settings(fresh_prefix.redis_url, prefix=fresh_prefix.prefix, moonshot_base_url=sim.base_url)


def test_a_message_popped_and_lost_before_any_claim_is_sent_again(
    swept: Settings, r: redis.Redis, sim: SimServer
) -> None:
    with Client(settings=swept) as client:
        job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
        # A node popped the message and was killed before it recorded it as unacknowledged.
        assert sum(r.delete(name) for name in queue_lists(swept)) == 1
        sweep = Sweeps(swept)
        assert sweep() == 0  # not yet silent for orphan_after_s
        _age(r, swept, job.id)
        assert sweep() == 0  # a first look: a node that just popped it would claim it within milliseconds
        assert sweep() == 1  # still without a message: sent again
        assert sweep() == 0  # its place in the index was refreshed: not sent twice in a row
        with node(swept, sim.base_url):
            assert job.result(timeout=20).choices[0].message.content
        assert not r.zscore(swept.keys.active_for(job.id), job.id)


def test_a_message_a_node_took_but_has_not_claimed_is_not_sent_again(swept: Settings, r: redis.Redis) -> None:
    # A node's receive took the message (recorded unacknowledged) and the node stopped before claiming the
    # job (SIGSTOP for a few seconds, or a burst it is still working through): redelivery covers it if the
    # node dies; the sweeper must not send a second copy meanwhile. A message left in no list and in no
    # node's hands is still sent again (the test above).
    with Client(settings=swept) as client:
        job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
    options = broker_config(swept)["broker_transport_options"]  # the nodes' list names and priorities
    with Connection(swept.broker_url, transport=transport.Transport, transport_options=options) as conn:
        message = conn.default_channel.basic_get(queue_for(swept, DEFAULT_TENANT))
        assert message is not None and r.hlen(f"{swept.keys.broker_prefix}unacked") == 1
        _age(r, swept, job.id)
        sweep = Sweeps(swept)
        assert [sweep(), sweep(), sweep()] == [0, 0, 0]
        assert not any(r.llen(n) for n in queue_lists(swept))  # no copy was sent
        message.ack()
    _age(r, swept, job.id)  # the sweeps that found it in a node's hands set it aside for orphan_after_s
    assert [sweep(), sweep()] == [0, 1]  # acknowledged and never claimed: now it is lost, and sent again


def test_a_dead_owners_job_whose_message_is_still_unacknowledged_is_left_to_redelivery(
    swept: Settings, r: redis.Redis
) -> None:
    # Its owner claimed it and died (or shut down and lost its requeue) holding the message: the entry in
    # kombu's unacked hash comes back by redelivery once it is visibility_timeout_s old. A copy sent
    # meanwhile was a second delivery (the nemesis, seed 62: re-sent at 8 s, redelivered at 33 s).
    with Client(settings=swept) as client:
        job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
    options = broker_config(swept)["broker_transport_options"]
    with Connection(swept.broker_url, transport=transport.Transport, transport_options=options) as conn:
        message = conn.default_channel.basic_get(queue_for(swept, DEFAULT_TENANT))
        assert message is not None and r.hlen(f"{swept.keys.broker_prefix}unacked") == 1
        r.hset(swept.keys.job(job.id), mapping={"status": "running", "owner": "dead", "attempt": 1, "heartbeat_at": 1})
        _age(r, swept, job.id)
        sweep = Sweeps(swept)
        assert [sweep(), sweep()] == [0, 0]
        assert not any(r.llen(n) for n in queue_lists(swept))  # no copy was sent
        message.ack()  # its entry gone without a redelivery (an ack that outlived the job's last write)
    _age(r, swept, job.id)
    assert sweep() == 1  # now the message is lost: sent again at once (a dead owner needs no second look)


def test_a_job_whose_owner_died_and_whose_message_is_lost_is_taken_over(
    swept: Settings, r: redis.Redis, sim: SimServer
) -> None:
    with Client(settings=swept) as client:
        job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
        for name in queue_lists(swept):
            r.delete(name)
        # Its owner claimed it and died; the acknowledgement survived, the message is gone.
        r.hset(swept.keys.job(job.id), mapping={"status": "running", "owner": "dead", "attempt": 1, "heartbeat_at": 1})
        _age(r, swept, job.id)
        assert Sweeps(swept)() == 1  # a dead owner: no second look needed
        with node(swept, sim.base_url):
            assert job.result(timeout=20).choices[0].message.content
        types = [e.type for e in job.events()]
        assert types.count("completed") == 1 and "retry" in types  # retry(worker_lost): the takeover


def test_a_job_still_in_the_queue_is_left_alone(swept: Settings, r: redis.Redis) -> None:
    with Client(settings=swept) as client:
        job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
        _age(r, swept, job.id)
        sweep = Sweeps(swept)
        assert sweep() == 0
        assert sweep() == 0
        assert sum(r.llen(name) for name in queue_lists(swept)) == 1


def test_a_job_recorded_but_never_sent_is_sent(swept: Settings, r: redis.Redis) -> None:
    with Client(settings=swept) as client:
        job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
    for name in queue_lists(swept):
        r.delete(name)
    r.hdel(swept.keys.job(job.id), JobField.SENT)  # its producer died before the broker took it
    _age(r, swept, job.id)
    assert Sweeps(swept)() == 1  # never sent: nothing to wait for
    record = JobRecord.from_redis(r.hgetall(swept.keys.job(job.id)))
    assert record is not None and record.sent and record.status is JobStatus.QUEUED
    [raw] = [r.lindex(name, -1) for name in queue_lists(swept) if r.llen(name)]
    assert raw is not None and json.loads(raw)["headers"]["id"] == job.id


def test_a_job_of_a_tenant_this_node_does_not_consume_is_not_piled_up_but_named(
    swept: Settings, r: redis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A producer with a tenants file, a node without: the job waits in its tenant's queue, which this node
    does not read. The sweeper leaves it there (a copy per sweep would pile up) and says what is wrong."""
    (tmp_path / "tenants.json").write_text(json.dumps({"tenants": {"ghost": {"tokens_sha256": []}}}))
    producer = swept.model_copy(update={"tenants_file": str(tmp_path / "tenants.json")})
    with Client(settings=producer, tenant="ghost") as client:
        job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
    ghost = [name for name in queue_lists(producer) if name not in queue_lists(swept)]  # its ten priority lists

    def waiting() -> int:
        return sum(int(r.llen(name)) for name in ghost)

    assert waiting() == 1
    _age(r, swept, job.id)
    sweep = Sweeps(swept)  # the node's settings: no tenants file
    with caplog.at_level(logging.ERROR, logger="moonq.worker"):
        assert sweep() == 0 and sweep() == 0 and sweep() == 0
    assert waiting() == 1
    assert "event=tenant_not_consumed tenant=ghost" in caplog.text


def test_an_orphan_behind_a_deep_queue_of_old_waiting_jobs_is_still_found(swept: Settings, r: redis.Redis) -> None:
    """A sweep reads the oldest ``BATCH`` silent jobs per group; 4,800 queued jobs older than an orphan
    (about 300 per group) used to fill every sweep, so the orphan was never reached while they waited."""
    with Client(settings=swept) as client:
        blockers = client.submit_many([{"model": "moonshot-v1-8k", "messages": [USER]}] * 4800)
        job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
    keys = swept.keys
    with r.pipeline(transaction=False) as pipe:
        for blocker in blockers:
            pipe.zadd(keys.active_for(blocker.id), {blocker.id: 0})  # all silent, and older than the orphan
        pipe.execute()
    for name in queue_lists(swept):  # the orphan's message is gone; the blockers' stay queued
        for raw in r.lrange(name, 0, -1):
            if json.loads(raw)["headers"]["id"] == job.id:
                r.lrem(name, 1, raw)  # type: ignore[arg-type]  # redis-py types the value as str; bytes are sent as is
    # Its owner claimed it and died.
    r.hset(keys.job(job.id), mapping={"status": "running", "owner": "dead", "attempt": 1, "heartbeat_at": 1})
    r.zadd(keys.active_for(job.id), {job.id: 1})
    group = sum(1 for b in blockers if keys.active_for(b.id) == keys.active_for(job.id))
    assert group > BATCH  # the orphan's group holds more old waiting jobs than one sweep reads
    sweep = Sweeps(swept)
    assert sweep() + sweep() == 1  # the first sweep reads the blockers and sets them aside; the next finds it
    assert sum(r.llen(name) for name in queue_lists(swept)) == 4801  # the blockers untouched, the orphan re-sent
