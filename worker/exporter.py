"""A node's ``/metrics`` endpoint, with the gauges that are read from Redis at scrape time.

``moonq_queue_depth`` counts the broker's queue when Prometheus asks, so it is right however many
nodes there are: all ten priority lists on a Redis broker, the ready messages of a passive
``queue.declare`` on RabbitMQ (``moonq.broker.QueueDepth``); on any other broker it is absent.
The delivery backlog (webhooks and callbacks owed, retrying, dead) is read the same way.
The limiter gauges show the fleet's headroom: the configured limit, what is available now (room in
the sliding window; free in-flight slots) and any shared cool-down. With a tenants file, each configured
tenant's spend today (UTC) and its daily budgets are read the same way (moonq/budgets.py).
Scrape-time reads use their own short-timeout clients; if Redis or the broker does not answer, its
gauges are left out of that scrape rather than failing it.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import redis
from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from moonq import budgets
from moonq.broker import QueueDepth
from moonq.tenants import cached_tenants
from worker.limiter_state import SUM_FIELD, LimiterKeys, window_used
from worker.metrics import REGISTRY
from worker.settings import Settings

log = logging.getLogger("moonq.worker")


class RedisCollector(Collector):
    """Queue depth (from the broker), limiter headroom and Redis memory (from Redis), read on each scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.depth = QueueDepth(settings, timeout_s=1.0)
        self.tenants = cached_tenants(settings.tenants_file) if settings.tenants_file else None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        waiting = self.depth.read()
        if waiting is not None:
            depth = GaugeMetricFamily("moonq_queue_depth", "Jobs waiting in the broker queue.", labels=["queue"])
            depth.add_metric([self.settings.queue], waiting)
            yield depth
        try:
            yield from self._collect()
            yield from self._budgets()
        except (redis.RedisError, OSError):
            log.warning("scrape: Redis did not answer; limiter gauges skipped")

    def _collect(self) -> Iterator[GaugeMetricFamily]:
        s, keys = self.settings, LimiterKeys.for_prefix(self.settings.prefix)
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.get(keys.cooldown)
        pipe.zrangebyscore(keys.inflight, "-inf", "+inf", withscores=True)
        pipe.info("memory")
        pipe.xlen(self.settings.keys.deliveries)
        pipe.zcard(self.settings.keys.deliveries_due)
        pipe.zcard(self.settings.keys.deliveries_dead)
        (sec, usec), cooldown, leases, memory, *backlog = pipe.execute()
        now_ms = sec * 1000 + usec / 1000
        limits = s.limits
        limit = GaugeMetricFamily("moonq_ratelimit_limit", "Configured fleet limit.", labels=["limit"])
        available = GaugeMetricFamily(
            "moonq_ratelimit_available",
            "Capacity available now: room in the sliding window (rpm, tpm; negative while usage exceeded"
            " its estimates) or free in-flight slots.",
            labels=["limit"],
        )
        for axis, cap in limits.rates:
            limit.add_metric([axis], cap)
            available.add_metric([axis], cap - self._window_used(keys, axis, now_ms - limits.window_ms))
        if limits.max_inflight:
            live = sum(1 for _, expiry in leases if expiry > now_ms)
            limit.add_metric(["inflight"], limits.max_inflight)
            available.add_metric(["inflight"], limits.max_inflight - live)
        yield limit
        yield available
        cool = GaugeMetricFamily(
            "moonq_ratelimit_cooldown_seconds", "Remaining shared cool-down after an upstream 429."
        )
        cool.add_metric([], max(0.0, (float(cooldown or 0) - now_ms) / 1000))
        yield cool
        # moonq's keys are not a cache (noeviction, ops/README.md): a full Redis refuses new jobs.
        mem = GaugeMetricFamily(
            "moonq_redis_memory_bytes",
            "Memory of the Redis holding jobs and events: used, and the maxmemory limit (0 = none).",
            labels=["kind"],
        )
        mem.add_metric(["used"], float(memory.get("used_memory", 0)))
        mem.add_metric(["max"], float(memory.get("maxmemory", 0)))
        yield mem
        yield delivery_backlog(backlog)

    def _window_used(self, keys: LimiterKeys, axis: str, cutoff_ms: float) -> int:
        """Units the fleet's window on ``axis`` holds, its grants at or before ``cutoff_ms`` left out."""
        window = keys.window(axis)
        pipe = self.redis.pipeline()  # one snapshot: no trim between the two reads
        pipe.hget(window.units, SUM_FIELD)
        pipe.zrangebyscore(window.grants, "-inf", cutoff_ms)
        stored_sum, expired = pipe.execute()
        return window_used(stored_sum, self.redis.hmget(window.units, expired) if expired else [])

    def _budgets(self) -> Iterator[GaugeMetricFamily]:
        """``moonq_tenant_spend`` and ``moonq_tenant_budget`` of each configured tenant (none without a file)."""
        if self.tenants is None:
            return
        names, day = self.tenants.names, budgets.utc_day(time.time())
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hmget(budgets.key(self.settings.prefix, name, day), budgets.FIELDS)
        spent = GaugeMetricFamily(
            "moonq_tenant_spend",
            "What each tenant's jobs used today (UTC), fleet-wide: tokens, and dollars at the nodes' prices.",
            labels=["tenant", "unit"],
        )
        budget = GaugeMetricFamily(
            "moonq_tenant_budget", "Each tenant's configured daily budget.", labels=["tenant", "unit"]
        )
        for name, raw in zip(names, pipe.execute(), strict=True):
            today = budgets.Spend.from_redis(raw)
            spent.add_metric([name, budgets.TOKENS], today.tokens)
            spent.add_metric([name, budgets.USD], today.usd)
            for unit, cap in budgets.limits(self.tenants.get(name)).items():
                budget.add_metric([name, unit], cap)
        yield spent
        yield budget


def delivery_backlog(counts: list[int]) -> GaugeMetricFamily:
    """``moonq_webhook_backlog``: deliveries in the stream, waiting to retry, and dead (moonq/deliveries.py)."""
    backlog = GaugeMetricFamily(
        "moonq_webhook_backlog",
        "Webhook and callback deliveries owed: queued (handed off, not yet settled), retrying, dead (gave up).",
        labels=["state"],
    )
    for state, n in zip(("queued", "retrying", "dead"), counts, strict=True):
        backlog.add_metric([state], float(n))
    return backlog


_started: dict[int, str] = {}


def advertised_url(settings: Settings, port: int) -> str:
    host = settings.metrics_host if settings.metrics_host not in ("", "0.0.0.0") else socket.gethostname()
    return f"http://{host}:{port}/metrics"


def start_exporter(settings: Settings) -> str | None:
    """Serve ``/metrics`` for this process (once); returns its URL, or None when disabled (port 0)."""
    if settings.metrics_port == 0:
        return None
    if settings.metrics_port in _started:
        return _started[settings.metrics_port]
    try:
        start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=REGISTRY)
    except OSError as err:  # e.g. two nodes on one host with the same MOONQ_METRICS_PORT
        log.error(
            "event=metrics_disabled port=%s error=%r: set MOONQ_METRICS_PORT per node", settings.metrics_port, err
        )
        return None
    REGISTRY.register(RedisCollector(settings))
    url = _started[settings.metrics_port] = advertised_url(settings, settings.metrics_port)
    log.info("event=metrics_listening url=%s", url)
    return url
