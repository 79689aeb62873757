"""The Redis transport the worker consumes with: kombu's, minus restore-on-close.

When the broker connection breaks, kombu's channel close tries to push every in-flight message
back to its queue, through the connection that just broke; in kombu 5.7 that raises inside
Celery's connection-error handler and the whole node stops ("Unrecoverable error"), so a Redis
restart would take every node down with it. moonq does not need that restore: a running job keeps
its message's unacked entry fresh (keepalive.py), acks it over whatever connection is current when
it ends, and a dead node's messages come back through the visibility timeout. So the node keeps
running its jobs through a Redis restart and reconnects.
"""

from __future__ import annotations

import logging

from kombu.transport import redis as kombu_redis
from redis.exceptions import RedisError

log = logging.getLogger("moonq.worker")


class Channel(kombu_redis.Channel):
    do_restore = False

    # A job that outlives a broker reconnect acks through the channel it came from, which the
    # reconnect closed (its connection is None: kombu raises AttributeError, Celery calls that
    # "Unrecoverable" and stops the node). The ack is not needed for correctness: the message is
    # redelivered after the visibility timeout and the claim skips a job that already ended.
    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        try:
            super().basic_ack(delivery_tag, multiple)  # type: ignore[no-untyped-call]
        except (AttributeError, RedisError, OSError):
            log.warning("ack of %s lost with its connection; redelivery will find the job ended", delivery_tag)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            super().basic_reject(delivery_tag, requeue)  # type: ignore[no-untyped-call]
        except (AttributeError, RedisError, OSError):
            log.warning(
                "reject of %s lost with its connection; it comes back after the visibility timeout", delivery_tag
            )


class Transport(kombu_redis.Transport):
    Channel = Channel
