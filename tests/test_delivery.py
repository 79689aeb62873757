"""Redelivery on the Redis broker: a tag per delivery, and Redis' clock (worker/transport.py).

Driven through kombu with moonq's transport against the real redis-server, as a node consumes.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.transport import redis as kombu_redis

from worker import transport


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
