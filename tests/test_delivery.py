"""Redelivery on the Redis broker: a tag per delivery, and Redis' clock (worker/transport.py).

Driven through kombu with moonq's transport against the real redis-server, as a node consumes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from kombu.asynchronous import Hub, set_event_loop
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.transport import redis as kombu_redis

from harness import RedisServer, WorkerProcess
from moonq.broker import broker_config, queue_for
from moonq.eventlog import read_log
from moonq.keys import Keys
from moonq.record import DEFAULT_TENANT, JobField
from producers import Client, Job
from simulator import SimConfig, SimServer
from tests.helpers import LONG, make_settings, node_env, wait_until
from worker import job as worker_job
from worker import transport
from worker.job import Outcome
from worker.loop import Runtime
from worker.settings import Settings


def _connection(redis_url: str, prefix: str, **options: Any) -> Connection:
    return Connection(
        redis_url,
        transport=transport.Transport,
        transport_options={"global_keyprefix": prefix, "visibility_timeout": 30, **options},
    )


def _receive(channel: Any, queue: str) -> Any:
    for _ in range(50):
        message = channel.basic_get(queue)
        if message is not None:
            return message
        time.sleep(0.05)
    raise AssertionError("no message")


def _consume(conn: Connection, queue: Queue, n: int) -> list[Any]:
    """The next ``n`` messages, received as a node receives them (BRPOP), not acknowledged."""
    got: list[Any] = []
    with conn.Consumer(queue, callbacks=[lambda _body, message: got.append(message)], accept=["json"]):
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            conn.drain_events(timeout=1)
    assert len(got) == n, f"{len(got)} of {n} messages"
    return got


def test_a_redelivered_message_has_its_own_tag_and_a_stale_ack_leaves_it_alone(redis_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    queue = Queue("jobs", Exchange("jobs"), "jobs")
    r = redis.Redis.from_url(redis_url)
    with _connection(redis_url, prefix) as conn:
        channel = conn.default_channel
        queue(channel).declare()
        producer = conn.Producer(serializer="json")
        producer.publish({"job": 1}, exchange=queue.exchange, routing_key="jobs", declare=[queue])

        first = _receive(channel, "jobs")
        # The visibility timeout passes while its node is paused: the message goes back to the queue.
        channel.qos.restore_by_tag(first.delivery_tag)
        second = _receive(channel, "jobs")
        assert second.delivery_tag != first.delivery_tag

        # The paused node wakes up and acknowledges its (stale) delivery.
        channel.basic_ack(first.delivery_tag)
        unacked = {k.decode() if isinstance(k, bytes) else k for k in r.hkeys(f"{prefix}unacked")}
        assert second.delivery_tag in unacked, "the stale ack deleted the live delivery's unacked entry"
        assert r.zscore(f"{prefix}unacked_index", second.delivery_tag) is not None

        channel.basic_ack(second.delivery_tag)
        assert not r.hkeys(f"{prefix}unacked")


def test_acks_in_one_turn_of_the_consumer_loop_remove_their_entries_in_one_round_trip() -> None:
    # Inside a worker's consumer loop (a running kombu Hub) an ack frees its prefetch slot at once and its
    # unacked entry goes with those of every other ack of the same turn, in one ZREM + HDEL. Outside it
    # (the other tests here; a hub left set by an embedded worker that is not running) acks remove at once.
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    queue = Queue("jobs", Exchange("jobs"), "jobs")
    hub = Hub()
    with RedisServer() as server, _connection(server.url, prefix) as conn:
        r = redis.Redis.from_url(server.url)
        channel = conn.default_channel
        queue(channel).declare()
        producer = conn.Producer(serializer="json")
        for i in range(5):
            producer.publish({"job": i}, exchange=queue.exchange, routing_key="jobs", declare=[queue])
        messages = [_receive(channel, "jobs") for _ in range(5)]
        assert r.hlen(f"{prefix}unacked") == 5
        zrem_before = r.info("commandstats").get("cmdstat_zrem", {}).get("calls", 0)
        set_event_loop(hub)
        try:
            hub.call_soon(lambda: [channel.basic_ack(m.delivery_tag) for m in messages])
            hub.run_once()  # this turn runs the acks
            assert r.hlen(f"{prefix}unacked") == 5, "removed before the loop's next turn"
            assert channel.qos.can_consume(), "the acks did not free their slots at once"
            hub.run_once()
        finally:
            set_event_loop(None)
            hub.close()
        assert r.hlen(f"{prefix}unacked") == 0 and r.zcard(f"{prefix}unacked_index") == 0
        assert r.info("commandstats")["cmdstat_zrem"]["calls"] - zrem_before == 1


def test_a_message_comes_back_from_its_unacked_entry_as_it_was_sent_typed_values_and_all(redis_url: str) -> None:
    """A plain message (every one moonq sends) is read and its unacked entry written by orjson; one with
    kombu's typed values (a datetime, a UUID in its headers) by kombu's JSON. Restored, each comes back
    with the same body and headers, its types kept."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    queue = Queue("jobs", Exchange("jobs"), "jobs")
    r = redis.Redis.from_url(redis_url)
    typed = {"when": datetime(2026, 12, 1, 21, 30, tzinfo=UTC), "ref": uuid.UUID(int=7)}
    with _connection(redis_url, prefix) as conn:
        channel = conn.default_channel
        queue(channel).declare()
        producer = conn.Producer(serializer="json")
        producer.publish({"job": 1, "text": "é ✓"}, exchange=queue.exchange, routing_key="jobs", declare=[queue])
        producer.publish({"job": 2}, exchange=queue.exchange, routing_key="jobs", headers=typed)
        sent = _consume(conn, queue, 2)  # BRPOP, as a node receives
        assert [type(m._raw) for m in sent] == [transport.PlainPayload, dict]
        entry = r.hget(f"{prefix}unacked", sent[0].delivery_tag)
        assert isinstance(entry, bytes) and json.loads(entry)[0]["properties"]["delivery_tag"] == sent[0].delivery_tag
        for message in sent:
            channel.qos.restore_by_tag(message.delivery_tag)
        back = {m.decode()["job"]: m for m in _consume(conn, queue, 2)}
        assert back[1].decode() == {"job": 1, "text": "é ✓"}
        assert back[2].decode() == {"job": 2}
        assert {k: back[2].headers[k] for k in typed} == typed  # a datetime and a UUID again, not strings


def test_an_unacked_entry_of_a_plain_message_that_came_to_hold_a_typed_value_is_written_by_kombu() -> None:
    """A value added to a plain message after it was read that orjson cannot write (a Decimal) sends its
    entry through kombu's JSON, which marks the type, rather than failing the receive."""
    raw = transport.PlainPayload({"body": "e30=", "properties": {"delivery_tag": "t1", "cost": Decimal("0.5")}})
    message = SimpleNamespace(_raw=raw, delivery_info={"exchange": "jobs", "routing_key": "jobs"})
    entry = transport._entry(message)
    assert json.loads(entry)[0]["properties"]["cost"] == {"__type__": "decimal", "__value__": "0.5"}
    plain = SimpleNamespace(_raw=transport.PlainPayload({"body": "e30="}), delivery_info=message.delivery_info)
    assert json.loads(transport._entry(plain)) == [{"body": "e30="}, "jobs", "jobs"]


@pytest.mark.parametrize("offset_s", [+15.0, -15.0])
def test_unacked_scores_and_the_restore_sweep_follow_redis_clock(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, offset_s: float
) -> None:
    """A node whose clock is off by 15 s neither restores live messages early nor keeps dead ones late."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    queue = Queue("jobs", Exchange("jobs"), "jobs")
    r = redis.Redis.from_url(redis_url)
    real_time = time.time
    # The whole process's clock is off: time.time, and kombu's own `from time import time`.
    monkeypatch.setattr(time, "time", lambda: real_time() + offset_s)
    monkeypatch.setattr(kombu_redis, "time", lambda: real_time() + offset_s)
    with _connection(redis_url, prefix, visibility_timeout=5, unacked_restore_throttle=1) as conn:
        channel = conn.default_channel
        queue(channel).declare()
        conn.Producer(serializer="json").publish(
            {"job": 1}, exchange=queue.exchange, routing_key="jobs", declare=[queue]
        )
        message = _receive(channel, "jobs")
        seconds, micros = r.time()
        score = r.zscore(f"{prefix}unacked_index", message.delivery_tag)
        assert score is not None and abs(score - (seconds + micros / 1e6)) < 1.0

        # Well inside the visibility timeout on Redis' clock: a sweep restores nothing.
        channel.qos.restore_visible(interval=1)
        assert r.zscore(f"{prefix}unacked_index", message.delivery_tag) is not None
        assert r.llen(f"{prefix}jobs") == 0


# ---- the runner's side: one delivery at a time, cancels that cannot be missed, no job comes back ----

USER = {"role": "user", "content": "Tell me a long story about the sea."}


@pytest.fixture(scope="module")
def story_sim() -> Iterator[SimServer]:
    """About 5 s per answer (100 tokens, 50 ms apart): long enough to act on a running job."""
    with SimServer(SimConfig(seed=3, chunk_interval_s=0.05, tokens_per_chunk=1, answer_tokens=(100, 100))) as server:
        yield server


def _runtime(prefix: Settings, base_url: str) -> Runtime:
    settings = make_settings(prefix.redis_url, prefix=prefix.prefix, moonshot_base_url=base_url)
    return Runtime(settings).start()


def _envelope(client: Client, job_id: str) -> dict[str, Any]:
    return dict(json.loads(client.job(job_id).record()["envelope"]))


def _streaming(rt: Runtime, client: Client) -> tuple[Job, Future[Outcome]]:
    """A job submitted and run on ``rt``, once a few of its deltas are written."""
    job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
    future = rt.submit(_envelope(client, job.id))
    wait_until(lambda: job.status() == "running" and int(job.record()["seq"]) > 3, 10, "streaming")
    return job, future


def _parked_behind_the_owner(rt: Runtime, client: Client) -> tuple[Job, Future[Outcome], Future[Outcome]]:
    """A job running on ``rt`` (its delivery tagged ``tag-1``) and a second delivery of it (``tag-2``), which
    the claim parks behind the live owner."""
    job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
    envelope = _envelope(client, job.id)
    first = rt.submit(envelope, "tag-1")
    wait_until(lambda: job.status() == "running", 10, "the first delivery runs")
    second = rt.submit(envelope, "tag-2")
    assert rt.ctx is not None
    ctx = rt.ctx
    wait_until(lambda: len(ctx.deliveries.of_job(job.id)) == 2, 5, "both deliveries tracked, the second parked")
    return job, first, second


def _forget(r: redis.Redis, keys: Keys, job_id: str) -> None:
    """What expiry does to an ended job: its record and log are gone."""
    r.delete(keys.job(job_id), keys.log(job_id))


def test_a_cancelled_job_whose_record_expired_does_not_come_back(fresh_prefix: Settings, sim: SimServer) -> None:
    rt = _runtime(fresh_prefix, sim.base_url)
    r = redis.Redis.from_url(fresh_prefix.redis_url)
    try:
        with Client(settings=fresh_prefix) as client:
            job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
            envelope = _envelope(client, job.id)
            assert job.cancel() is True
            _forget(r, fresh_prefix.keys, job.id)  # a backlog outlived the cancelled job's records
            assert rt.run(envelope) == "skipped"  # its message is finally delivered
            assert not r.exists(fresh_prefix.keys.job(job.id)), "the claim recreated the job"
            assert not r.exists(fresh_prefix.keys.log(job.id))
    finally:
        rt.stop()


def test_a_duplicate_message_of_a_job_that_ended_long_ago_runs_nothing(fresh_prefix: Settings, sim: SimServer) -> None:
    rt = _runtime(fresh_prefix, sim.base_url)
    r = redis.Redis.from_url(fresh_prefix.redis_url)
    try:
        with Client(settings=fresh_prefix) as client:
            job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
            envelope = _envelope(client, job.id)
            assert rt.run(envelope) == "succeeded"
            _forget(r, fresh_prefix.keys, job.id)
            assert rt.run(envelope) == "skipped"
            assert not r.exists(fresh_prefix.keys.job(job.id))
    finally:
        rt.stop()


def test_a_cancel_announced_while_the_node_is_not_listening_still_stops_the_job(story_sim: SimServer) -> None:
    # A Redis of its own: the test cuts every pub/sub connection on it.
    with RedisServer() as server:
        settings = make_settings(server.url, moonshot_base_url=story_sim.base_url)
        rt = Runtime(settings).start()
        r = redis.Redis.from_url(server.url)
        try:
            with Client(settings=settings) as client:
                job, future = _streaming(rt, client)
                # The node's listener loses its connection (it resubscribes a second later) and the
                # cancel is announced in that gap: pub/sub delivers it to nobody.
                r.client_kill_filter(_type="pubsub")
                asked = time.monotonic()
                assert job.cancel() is True
                assert future.result(timeout=10) == "cancelled"
                # Caught by the next heartbeat (FAST: every 0.5 s), long before the 5 s answer ends.
                assert time.monotonic() - asked < 2.5
                assert job.status() == "cancelled"
        finally:
            rt.stop()


def test_a_cancel_the_node_never_heard_of_still_ends_the_job_cancelled(
    fresh_prefix: Settings, story_sim: SimServer
) -> None:
    # The nemesis (seed 63): a node's link to Redis refused for 2.6 s right after a cancel was announced;
    # the answer ended meanwhile and the node wrote it completed as its link came back. Here the announcement
    # is never made and the heartbeat that reads the flag back is slow: the job's own end must see the flag.
    slow_beat = {
        "heartbeat_interval_s": 60.0,
        "heartbeat_stale_s": 180.0,
        "visibility_timeout_s": 240.0,
        "orphan_after_s": 600.0,
    }
    settings = make_settings(
        fresh_prefix.redis_url, prefix=fresh_prefix.prefix, moonshot_base_url=story_sim.base_url, **slow_beat
    )
    rt = Runtime(settings).start()
    r = redis.Redis.from_url(settings.redis_url)
    try:
        with Client(settings=settings) as client:
            job, future = _streaming(rt, client)
            r.hset(settings.keys.job(job.id), JobField.CANCEL_REQUESTED, "1")  # a cancel whose announcement was lost
            assert future.result(timeout=30) == "cancelled"
            assert job.status() == "cancelled"
            types = [e.type for e in job.events()]
            assert types[-1] == "cancelled" and "completed" not in types and types.count("delta") > 3
    finally:
        r.close()
        rt.stop()


def test_two_deliveries_of_one_job_in_one_process_are_tracked_apart(
    fresh_prefix: Settings, story_sim: SimServer
) -> None:
    """A redelivered copy waits parked behind the live owner; the owner's end does not drop the copy."""
    rt = _runtime(fresh_prefix, story_sim.base_url)
    try:
        with Client(settings=fresh_prefix) as client:
            job, first, second = _parked_behind_the_owner(rt, client)
            assert rt.ctx is not None
            ctx = rt.ctx
            owners = [d for d in ctx.deliveries.of_job(job.id) if d.owns]
            assert [d.tag for d in owners] == ["tag-1"]
            assert first.result(timeout=20) == "succeeded"
            assert second.result(timeout=10) == "skipped"  # it finds the job ended at its next claim
            assert not ctx.deliveries.of_job(job.id)
            assert job.record()["attempt"] == "1"
    finally:
        rt.stop()


def test_a_shutdown_whose_cancel_was_lost_still_hands_the_job_back_before_its_call(
    fresh_prefix: Settings, story_sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Runtime.shutdown`` sets its flag and cancels each job once; on Python 3.11 a cancel that lands
    while a Redis command is sent is lost (moonq/cancel.py). Here the shutdown comes during the job's
    last check before its upstream call and its cancel never arrives: the job goes back all the same."""
    rt = _runtime(fresh_prefix, story_sim.base_url)
    assert rt.ctx is not None
    ctx = rt.ctx
    before = story_sim.stats()["requests"]
    real = worker_job._still_ours

    async def shutdown_during_the_check(*args: Any) -> None:
        ctx.shutting_down = True  # Runtime.shutdown's flag; its cancel, lost in the Redis call, never comes
        await real(*args)

    monkeypatch.setattr(worker_job, "_still_ours", shutdown_during_the_check)
    try:
        with Client(settings=fresh_prefix) as client:
            job = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
            assert rt.submit(_envelope(client, job.id)).result(timeout=10) == "requeued"
            assert job.status() == "queued"
            assert read_log(client.redis, client.keys, job.id)[-1].reason == "worker_shutdown"
            assert story_sim.stats()["requests"] == before  # no upstream call was paid for
    finally:
        rt.stop()


def test_a_parked_delivery_stops_waiting_when_the_node_shuts_down_even_without_its_cancel(
    fresh_prefix: Settings, story_sim: SimServer
) -> None:
    """A second delivery parked behind the job's live owner goes back once the node shuts down, also
    when the shutdown's cancel was lost (the flag alone is set here): it does not wait out the job."""
    rt = _runtime(fresh_prefix, story_sim.base_url)
    assert rt.ctx is not None
    ctx = rt.ctx
    try:
        with Client(settings=fresh_prefix) as client:
            _job, first, second = _parked_behind_the_owner(rt, client)
            ctx.shutting_down = True
            # Within a parked wait (heartbeat_interval_s: 0.5 s in tests), long before the ~5 s answer ends.
            assert second.result(timeout=2) == "requeued"
            assert not first.done()
            rt.shutdown()
            assert first.result(timeout=10) == "requeued"
    finally:
        rt.stop()


def test_a_delivery_taken_over_while_it_waited_for_capacity_makes_no_upstream_call(fresh_prefix: Settings) -> None:
    """A stalled delivery whose job moved on must find out before it pays for a call, not after."""
    sim_cfg = SimConfig(seed=3, chunk_interval_s=0.05, tokens_per_chunk=1, answer_tokens=(40, 40))
    with SimServer(sim_cfg) as sim:
        settings = make_settings(
            fresh_prefix.redis_url, prefix=fresh_prefix.prefix, moonshot_base_url=sim.base_url, max_inflight=1
        )
        rt = Runtime(settings).start()
        r = redis.Redis.from_url(fresh_prefix.redis_url)
        try:
            with Client(settings=fresh_prefix) as client:
                first = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
                second = client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
                running = rt.submit(_envelope(client, first.id))
                wait_until(lambda: int(first.record()["seq"]) > 2, 10, "the first job streams")
                waiting = rt.submit(_envelope(client, second.id))
                wait_until(lambda: second.status() == "running", 5, "the second job claimed, waiting for the slot")
                # Meanwhile another node took the second job over.
                r.hset(fresh_prefix.keys.job(second.id), "owner", "another-delivery")
                assert running.result(timeout=20) == "succeeded"
                assert waiting.result(timeout=10) == "skipped"
                assert sim.stats()["requests"] == 1
        finally:
            rt.stop()


def test_a_burst_is_received_a_few_messages_per_brpop_each_recorded_unacked(slow_sim: SimServer) -> None:
    # 60 jobs queued at once before a node starts: its receives take up to DRAIN_MAX + 1 each (one round
    # trip, one GIL hand-over per batch, where kombu takes one per BRPOP), and every message it takes is
    # recorded unacked, as a BRPOP's is, so a node killed now would hand all 60 back.
    with RedisServer() as server:
        settings = make_settings(server.url)
        r = redis.Redis.from_url(server.url)
        with Client(settings=settings) as client:
            jobs = client.submit_many([LONG] * 60)
            with WorkerProcess(node_env(settings, slow_sim.base_url)) as node:
                assert node.proc is not None
                unacked = f"{settings.keys.broker_prefix}unacked"
                wait_until(lambda: r.hlen(unacked) == 60, 20, "all 60 messages taken and recorded unacked")
                assert r.zcard(f"{settings.keys.broker_prefix}unacked_index") == 60
                brpops = int(r.info("commandstats").get("cmdstat_brpop", {}).get("calls", 0))
                assert brpops < 25, brpops  # 66 when each BRPOP takes one (idle ones included)
                for job in jobs:
                    assert job.result(timeout=60).choices[0].message.content
                wait_until(lambda: r.hlen(unacked) == 0, 10, "every message acked")


def test_a_received_message_waiting_for_a_thread_is_kept_alive_until_acked(
    fresh_prefix: Settings, sim: SimServer
) -> None:
    # A task received but not running yet (every pool thread busy: after a broker reconnect the new channel
    # prefetches again while the old deliveries still run) must not have its message restored to another
    # node while this one is about to run it: the heartbeat keeps its unacked entry fresh, as a running
    # delivery's. Once acknowledged, it is no longer this node's to keep.
    rt = _runtime(fresh_prefix, sim.base_url)
    r = redis.Redis.from_url(fresh_prefix.redis_url)
    index = f"{fresh_prefix.keys.broker_prefix}unacked_index"
    options = broker_config(fresh_prefix)["broker_transport_options"]
    try:
        with Client(settings=fresh_prefix) as client:
            client.submit({"model": "moonshot-v1-8k", "messages": [USER]})
        with Connection(fresh_prefix.broker_url, transport=transport.Transport, transport_options=options) as conn:
            message = conn.default_channel.basic_get(queue_for(fresh_prefix, DEFAULT_TENANT))
            assert message is not None and message.delivery_tag in transport.held_tags()
            r.zadd(index, {message.delivery_tag: 1.0})  # stale: the restore sweep would take it now
            wait_until(lambda: (r.zscore(index, message.delivery_tag) or 0) > 1.0, 5, "the entry refreshed")
            message.ack()
            assert message.delivery_tag not in transport.held_tags()
            assert r.zscore(index, message.delivery_tag) is None
    finally:
        rt.stop()
