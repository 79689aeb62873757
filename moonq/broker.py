"""The Celery side shared by producers and workers: how messages are serialized and routed.

Producers build a minimal app from this to ``send_task`` by name; the worker's app starts
from the same dictionary, so the two can never disagree on serializer, queue or key prefix.

Two brokers are supported, chosen by the scheme of ``CELERY_BROKER_URL`` (default: ``REDIS_URL``):

- Redis (``redis://``, ``rediss://``, ``unix://``): every broker key carries ``MOONQ_PREFIX``; ten
  priority lists, 0 the most urgent. A ``rediss://`` broker verifies the server's certificate unless
  the URL says otherwise (kombu alone would not verify it). A Sentinel-managed Redis
  (``redis+sentinel://``, moonq/redisurl.py) is the same broker reached through kombu's Sentinel
  transport, whose URL and ``master_name``/``sentinel_kwargs`` options are derived from moonq's URL.
Each tenant of the tenants file has a queue of its own (``<queue>.<tenant>``; the default tenant
keeps ``<queue>``), so one tenant's flood is not ahead of another tenant's jobs in one line. A node
consumes all of them; on Redis it takes them in smooth weighted round robin by the tenants'
weights (``TenantCycle``), so what the nodes hold, and then what the limiter shares out between
waiting tenants (worker/ratelimit.py), follows the weights even when the backlogs are deeper than
the fleet's concurrency. A message priority still goes first across queues.

- RabbitMQ (``amqp://``): the queue is declared with ``x-max-priority`` (by producers and workers
  alike, or RabbitMQ refuses the second declaration) and AMQP's priorities run the other way (9 the
  most urgent), so ``message_priority`` turns moonq's 0 into 9. Publishes wait for the broker's
  confirm, so a job whose ``submit`` returned is in the queue. Workers ask for a delivery
  acknowledgement timeout of a day (see ``AMQP_CONSUMER_TIMEOUT_MS``).
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from typing import Any

import redis
from celery import Celery
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.utils.scheduling import round_robin_cycle

from moonq.record import DEFAULT_TENANT
from moonq.redisurl import is_sentinel_url, kombu_sentinel, sync_redis
from moonq.settings import ClientSettings, is_amqp_url, is_redis_url, url_scheme
from moonq.tenants import cached_tenants
from moonq.wire import TASK_NAME, JobEnvelope, JobTicket

log = logging.getLogger("moonq")

# RabbitMQ priorities: x-max-priority 9 gives the ten levels 0..9 (9 delivered first).
AMQP_MAX_PRIORITY = 9
# RabbitMQ closes a consumer's channel when a delivery stays unacknowledged longer than its
# consumer_timeout (server default 30 min) and hands every message of that channel to someone else.
# A moonq job holds its message until it ends: waiting for fleet capacity, then up to an hour of
# attempts (MOONQ_JOB_DEADLINE_S) plus the last one (MOONQ_ATTEMPT_TIMEOUT_S). Workers ask for a day
# per consumer (RabbitMQ >= 3.12 honours ``x-consumer-timeout``; older servers ignore it and need
# ``consumer_timeout`` raised in rabbitmq.conf, see the README).
AMQP_CONSUMER_TIMEOUT_MS = 24 * 3600 * 1000

# kombu's Redis transport names priority lists "<queue>\x06\x16<n>"; priority 0 uses the bare name.
PRIORITY_SEP = "\x06\x16"


# Each tenant queue's weight, as the node's tenants file gives it (``broker_config`` fills it in); kombu
# builds ``TenantCycle`` without arguments, so it reads them here.
QUEUE_WEIGHTS: dict[str, int] = {}
# What the node holds of each queue's jobs now (waiting for capacity), when the node says
# (``set_queue_load``); called from kombu's consumer thread.
_queue_load: Callable[[], Mapping[str, int]] | None = None


def set_queue_load(load: Callable[[], Mapping[str, int]] | None) -> None:
    """Let ``TenantCycle`` take first from the queue whose tenant the node holds least of, per weight."""
    global _queue_load
    _queue_load = load


def queue_for(settings: ClientSettings, tenant: str) -> str:
    """The broker queue of ``tenant``'s jobs (the default tenant's is ``MOONQ_QUEUE`` itself)."""
    return settings.queue if tenant == DEFAULT_TENANT else f"{settings.queue}.{tenant}"


def queues(settings: ClientSettings) -> list[str]:
    """Every job queue a node consumes: the default tenant's, then each tenant's of the file."""
    names = cached_tenants(settings.tenants_file).names if settings.tenants_file else ()
    return [settings.queue] + [queue_for(settings, name) for name in names if name != DEFAULT_TENANT]


class TenantCycle(round_robin_cycle):
    """kombu's queue order for a Redis consumer: the tenants' queues in weighted turns.

    kombu asks ``consume`` for the order in which one BRPOP lists the queues (each message priority
    in turn, the queues in this order within it) and calls ``rotate`` with the queue a message came
    from. On a node (``set_queue_load``), the queue whose tenant has the fewest jobs waiting in the
    node for capacity, per unit of weight, is listed first: the node holds each tenant's jobs in
    proportion to its weight, so the limiter always has every tenant's next job to weigh, and a
    tenant whose jobs go fast is refilled fast. Ties, and a consumer without a load, fall back to
    smooth weighted round robin: every queue earns its weight in credit per message taken, the one
    that gave it pays the total, the richest is listed first (with weights 1 and 3 and both queues
    full, three of every four messages come from the second, interleaved). An empty queue's credit is
    capped at twice the total, so a tenant back from idling gets at most a round or two ahead.
    """

    def __init__(self, it: list[str] | None = None) -> None:
        super().__init__(it)  # type: ignore[no-untyped-call]
        self.credit: dict[str, int] = {}

    def consume(self, n: int) -> list[str]:
        load = _queue_load() if _queue_load is not None else {}
        return sorted(
            self.items[:n],
            key=lambda queue: (load.get(queue, 0) / QUEUE_WEIGHTS.get(queue, 1), -self.credit.get(queue, 0)),
        )

    def rotate(self, last_used: str) -> str:
        if last_used not in self.items:
            return last_used
        weights = {queue: QUEUE_WEIGHTS.get(queue, 1) for queue in self.items}
        total = sum(weights.values())
        for queue, weight in weights.items():
            self.credit[queue] = min(self.credit.get(queue, 0) + weight, 2 * total)
        self.credit[last_used] -= total
        return last_used


def broker_config(settings: ClientSettings) -> dict[str, Any]:
    url = settings.broker_url
    names = queues(settings)
    if settings.tenants_file:
        tenants = cached_tenants(settings.tenants_file)
        QUEUE_WEIGHTS.update({queue_for(settings, t): tenants.get(t).weight for t in tenants.names})
    config: dict[str, Any] = {
        "broker_url": url,
        # JSON only: a crafted message cannot carry a pickle that runs code.
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.queue,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {},
    }
    if is_redis_url(url):
        config["broker_transport_options"] = {
            # Every Redis key moonq writes starts with the prefix, the broker's too.
            "global_keyprefix": settings.keys.broker_prefix,
            # Ten priority lists, 0 the most urgent (Celery's default folds 10 levels into 4).
            "priority_steps": list(range(10)),
            # The tenants' queues in weighted turns (kombu resolves the dotted name).
            "queue_order_strategy": "moonq.broker:TenantCycle",
        }
        if len(names) > 1:
            config["task_queues"] = [Queue(name) for name in names]  # type: ignore[no-untyped-call]
        if is_sentinel_url(url):
            sentinel = kombu_sentinel(url)
            config["broker_url"] = sentinel.broker_url
            config["broker_transport_options"].update(sentinel.transport_options)
            if sentinel.use_ssl is not None:
                config["broker_use_ssl"] = sentinel.use_ssl
        elif url_scheme(url) == "rediss":
            # Verify the server like redis-py does for REDIS_URL. ssl_* parameters in the URL replace
            # this whole dict (kombu reads them there), e.g. ?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem.
            config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    elif is_amqp_url(url):
        # One explicit queue, the same in producers and workers (its arguments must match everywhere).
        config["task_queues"] = [amqp_queue(settings, name) for name in names]
        config["broker_transport_options"] = {"confirm_publish": True}
    return config


def amqp_queue(settings: ClientSettings, name: str | None = None) -> Queue:
    """A job queue on RabbitMQ (``MOONQ_QUEUE``, or a tenant's ``name``): Celery's default layout (a
    direct exchange named like the queue) with ten priority levels, consumed with a long
    acknowledgement timeout."""
    name = name or settings.queue
    return Queue(  # type: ignore[no-untyped-call]
        name,
        Exchange(name, type="direct"),  # type: ignore[no-untyped-call]
        routing_key=name,
        queue_arguments={"x-max-priority": AMQP_MAX_PRIORITY},
        consumer_arguments={"x-consumer-timeout": AMQP_CONSUMER_TIMEOUT_MS},
    )


def message_priority(settings: ClientSettings, priority: int) -> int:
    """The broker's priority for moonq's ``priority`` (0 the most urgent … 9)."""
    return AMQP_MAX_PRIORITY - priority if is_amqp_url(settings.broker_url) else priority


def producer_app(settings: ClientSettings) -> Celery:
    app = Celery("moonq-producer", set_as_current=False)
    app.conf.update(broker_config(settings))
    return app


def send_envelope(
    app: Celery, settings: ClientSettings, envelope: JobEnvelope, producer: Any = None, tenant: str = DEFAULT_TENANT
) -> None:
    """Send one job's message, to its tenant's queue: by task name (no worker code needed), with the job
    id as the task id. The message is a ``JobTicket``: the request stays in the job's record alone (one
    copy of it in Redis, not three: the record's, the message's, and that one base64-encoded again).

    Used by producers at submit and by the nodes' sweeper when it re-sends an orphaned job; a
    duplicate message is harmless (the claim runs a job once). ``producer``: a kombu producer to
    send through (a batch), else the app's own.
    """
    app.send_task(
        TASK_NAME,
        args=[JobTicket.of(envelope).model_dump(mode="json")],
        task_id=envelope.job_id,
        queue=queue_for(settings, tenant),
        priority=message_priority(settings, envelope.priority),
        producer=producer,
        # Celery copies a repr of the arguments into the message headers for its logs and monitors.
        # The arguments are a whole prompt: keep it out of headers (and skip the costly repr).
        argsrepr=f"(<job {envelope.job_id} {envelope.request.get('model')}>,)",
        kwargsrepr="{}",
    )


def queue_lists(settings: ClientSettings) -> list[str]:
    """The Redis lists that hold the job queues (every tenant's), one per queue and priority."""
    out = []
    for name in queues(settings):
        base = f"{settings.keys.broker_prefix}{name}"
        out += [base] + [f"{base}{PRIORITY_SEP}{p}" for p in range(1, 10)]
    return out


class QueueDepth:
    """Jobs waiting in the broker's queue, read when asked (thread-safe; one connection, reopened on error).

    Redis: the length of the ten priority lists. RabbitMQ: the ready-message count of a passive
    ``queue.declare`` (messages delivered to a node and not yet acknowledged are not counted; they
    are running or about to). Any other broker, or a broker that does not answer within
    ``timeout_s``: ``None``, so the gauge is left out rather than wrong.
    """

    def __init__(self, settings: ClientSettings, timeout_s: float = 1.0) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._redis: redis.Redis | None = None
        self._amqp: Connection | None = None

    def read(self) -> int | None:
        url = self.settings.broker_url
        with self._lock:
            try:
                if is_redis_url(url):
                    return self._redis_depth()
                if is_amqp_url(url):
                    return self._amqp_depth()
            except Exception as err:  # a scrape must not fail because the broker did not answer
                log.warning("queue depth: the broker did not answer (%s); gauge skipped", type(err).__name__)
                self._close()
            return None

    def _redis_depth(self) -> int:
        if self._redis is None:
            self._redis = sync_redis(
                self.settings.broker_url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s
            )
        pipe = self._redis.pipeline(transaction=False)
        for name in queue_lists(self.settings):
            pipe.llen(name)
        return sum(pipe.execute())

    def _amqp_depth(self) -> int:
        return sum(self._amqp_ready(name) for name in queues(self.settings))

    def _amqp_ready(self, name: str) -> int:
        if self._amqp is None:
            self._amqp = Connection(  # type: ignore[no-untyped-call]
                self.settings.broker_url,
                connect_timeout=self.timeout_s,
                # One try per read: a scrape must not wait for reconnects.
                transport_options={"read_timeout": self.timeout_s, "write_timeout": self.timeout_s, "max_retries": 0},
            )
        channel = self._amqp.default_channel
        try:
            _, ready, _ = channel.queue_declare(queue=name, passive=True)  # type: ignore[no-untyped-call]
        except Exception as err:
            if getattr(err, "code", None) != 404:
                raise
            self._close()  # NOT_FOUND closed the channel; no node has declared the queue yet: none waiting
            return 0
        return int(ready)

    def _close(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self._amqp is not None:
            try:
                self._amqp.release()  # type: ignore[no-untyped-call]
            except Exception:  # already broken
                pass
            self._amqp = None

    def close(self) -> None:
        with self._lock:
            self._close()
