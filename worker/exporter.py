"""A node's ``/metrics`` endpoint, with the gauges that are read from Redis at scrape time.

``moonq_queue_depth`` counts the broker's queue when Prometheus asks, so it is right however many
nodes there are: all ten priority lists on a Redis broker, the ready messages of a passive
``queue.declare`` on RabbitMQ (``moonq.broker.QueueDepth``); on any other broker it is absent.
The delivery backlog (webhooks and callbacks owed, retrying, dead) is read the same way.
The limiter gauges show the fleet's headroom per upstream account (worker/accounts.py; without an
accounts file the one account ``default``, in the ``fleet`` scope): the configured limit, what is
available now (room in the sliding window; free in-flight slots), any cool-down after a 429 and how long
the account is still out of rotation; with an accounts file, an optional cap over all accounts as
``account="all"``. With a tenants file, each configured tenant's own limits are read the same way, and
its spend today (UTC) and its daily budgets (moonq/budgets.py). A scrape's round trips to Redis do not
grow with the number of accounts and tenants (each family is read in one pipeline), only its reads do.
Scrape-time reads use their own short-timeout clients; if Redis or the broker does not answer, its
gauges are left out of that scrape rather than failing it.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis
from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from moonq import budgets
from moonq.broker import QueueDepth
from moonq.keys import GROUPS
from moonq.redisurl import is_cluster_client, sync_redis
from moonq.tenants import cached_tenants
from worker.accounts import load_accounts
from worker.limiter_state import FLEET, SUM_FIELD, LimiterKeys, window_used
from worker.metrics import REGISTRY
from worker.ratelimit import Limits, shares
from worker.settings import Settings

log = logging.getLogger("moonq.worker")


@dataclass(frozen=True)
class _Scope:
    """One limiter scope the gauges show: its label value (account or tenant name), its scope, its limits."""

    label: str
    scope: str
    limits: Limits

    @property
    def caps(self) -> list[tuple[str, int]]:
        """(limit label, value) of each configured limit: ``rpm``, ``tpm``, ``inflight``."""
        inflight = [("inflight", self.limits.max_inflight)] if self.limits.max_inflight else []
        return [*self.limits.rates, *inflight]


def _limited(limits: Limits) -> bool:
    return bool(limits.rpm or limits.tpm or limits.max_inflight)


def _left_s(until_ms: bytes | None, now_ms: float) -> float:
    """Seconds from ``now_ms`` to a stored until-when (Redis ms); 0 when absent or past."""
    return max(0.0, (float(until_ms or 0) - now_ms) / 1000)


class RedisCollector(Collector):
    """Queue depth (from the broker), limiter headroom and Redis memory (from Redis), read on each scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = sync_redis(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.depth = QueueDepth(settings, timeout_s=1.0)
        self.tenants = cached_tenants(settings.tenants_file) if settings.tenants_file else None
        # The same scopes as the node's Limiter (worker/loop.py): without an accounts file the one account's
        # state is the fleet scope's; with one, each account has its own and the settings' limits cap them all.
        pooled = bool(settings.accounts_file)
        self.accounts = [
            _Scope(account.name, f"account:{account.name}" if pooled else FLEET, account.limits)
            for account in load_accounts(settings)
        ]
        self.cap = _Scope("all", FLEET, settings.limits) if pooled and _limited(settings.limits) else None
        self.tenant_scopes = [
            _Scope(name, f"tenant:{name}", share.limits)
            for name, share in (shares(self.tenants) if self.tenants else {}).items()
            if _limited(share.limits)
        ]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        waiting = self.depth.read()
        if waiting is not None:
            depth = GaugeMetricFamily("moonq_queue_depth", "Jobs waiting in the broker queue.", labels=["queue"])
            depth.add_metric([self.settings.queue], waiting)
            yield depth
        try:
            yield from self._collect()
            yield from self._budgets()
        except (redis.RedisError, RedisClusterException, OSError):
            log.warning("scrape: Redis did not answer; limiter gauges skipped")

    def _collect(self) -> Iterator[GaugeMetricFamily]:
        keys = LimiterKeys.for_prefix(self.settings.prefix)
        # TIME and INFO apart from the pipeline: a cluster pipeline carries only commands on keys.
        sec, usec = self.redis.time()
        memory = redis_memory(self.redis)
        pipe = self.redis.pipeline(transaction=False)
        for account in self.accounts:
            pipe.get(keys.scope_cooldown(account.scope))
            pipe.get(keys.scope_out(account.scope))
        for group in GROUPS:
            pipe.xlen(self.settings.keys.deliveries_in(group))
            pipe.zcard(self.settings.keys.deliveries_due_in(group))
            pipe.zcard(self.settings.keys.deliveries_dead_in(group))
        replies = pipe.execute()
        untils, counts = replies[: 2 * len(self.accounts)], replies[2 * len(self.accounts) :]
        backlog = [sum(int(n) for n in counts[i::3]) for i in range(3)]
        now_ms = sec * 1000 + usec / 1000
        capped = [*self.accounts, *([self.cap] if self.cap else [])]
        used = self._used(keys, [*capped, *self.tenant_scopes], now_ms)
        limit = GaugeMetricFamily(
            "moonq_ratelimit_limit",
            'Configured limit of each upstream account (account="all": the optional cap over all of them).',
            labels=["account", "limit"],
        )
        available = GaugeMetricFamily(
            "moonq_ratelimit_available",
            "Capacity available now: room in the sliding window (rpm, tpm; negative while usage exceeded"
            " its estimates) or free in-flight slots.",
            labels=["account", "limit"],
        )
        for scope in capped:
            for axis, cap in scope.caps:
                limit.add_metric([scope.label, axis], cap)
                available.add_metric([scope.label, axis], cap - used[scope.scope, axis])
        yield limit
        yield available
        cool = GaugeMetricFamily(
            "moonq_ratelimit_cooldown_seconds",
            "Remaining cool-down of each account after an upstream 429.",
            labels=["account"],
        )
        out = GaugeMetricFamily(
            "moonq_account_out_of_rotation_seconds",
            "Remaining time each account is out of rotation (balance gone, key refused); 0 in rotation.",
            labels=["account"],
        )
        for i, account in enumerate(self.accounts):
            cool.add_metric([account.label], _left_s(untils[2 * i], now_ms))
            out.add_metric([account.label], _left_s(untils[2 * i + 1], now_ms))
        yield cool
        yield out
        if self.tenants is not None:
            yield from self._tenant_limits(used)
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

    def _tenant_limits(self, used: dict[tuple[str, str], int]) -> Iterator[GaugeMetricFamily]:
        """``moonq_tenant_limit`` and ``moonq_tenant_available`` of each tenant with limits of its own."""
        limit = GaugeMetricFamily(
            "moonq_tenant_limit",
            "Each tenant's own fleet-wide limits (rpm, tpm, inflight).",
            labels=["tenant", "limit"],
        )
        available = GaugeMetricFamily(
            "moonq_tenant_available",
            "Capacity available now within each tenant's own limits, as moonq_ratelimit_available.",
            labels=["tenant", "limit"],
        )
        for scope in self.tenant_scopes:
            for axis, cap in scope.caps:
                limit.add_metric([scope.label, axis], cap)
                available.add_metric([scope.label, axis], cap - used[scope.scope, axis])
        yield limit
        yield available

    def _used(self, keys: LimiterKeys, scopes: list[_Scope], now_ms: float) -> dict[tuple[str, str], int]:
        """``(scope, axis) -> units`` each scope holds on each of its limits at ``now_ms``: a window's units
        with its grants at or before ``now_ms - window`` left out, or the leases in flight.

        Two round trips whatever the number of scopes: one snapshot of every window (no trim between a
        window's two reads) and the in-flight counts, then the units of the grants that have left.
        """
        cutoff_ms = now_ms - self.settings.limits.window_ms  # the Limiter's window, in every scope
        pipe = self.redis.pipeline()
        for scope in scopes:
            for axis, _ in scope.limits.rates:
                window = keys.window(axis, scope.scope)
                pipe.hget(window.units, SUM_FIELD)
                pipe.zrangebyscore(window.grants, "-inf", cutoff_ms)
            if scope.limits.max_inflight:
                pipe.zcount(keys.scope_inflight(scope.scope), f"({now_ms}", "+inf")  # leases not expired
        replies = iter(pipe.execute())
        used: dict[tuple[str, str], int] = {}
        left: list[tuple[tuple[str, str], bytes | None, list[bytes]]] = []
        expired = self.redis.pipeline(transaction=False)
        for scope in scopes:
            for axis, _ in scope.limits.rates:
                stored_sum, gone = next(replies), next(replies)
                left.append(((scope.scope, axis), stored_sum, gone))
                if gone:
                    expired.hmget(keys.window(axis, scope.scope).units, gone)
            if scope.limits.max_inflight:
                used[scope.scope, "inflight"] = int(next(replies))
        units = iter(expired.execute() if any(gone for _, _, gone in left) else [])
        for key, stored_sum, gone in left:
            used[key] = window_used(stored_sum, next(units) if gone else [])
        return used

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


def redis_memory(client: redis.Redis) -> dict[str, float]:
    """``used_memory`` and ``maxmemory`` of the Redis holding jobs: on a Redis Cluster, summed over its primaries."""
    if not is_cluster_client(client):
        info = client.info("memory")
        return {name: float(info.get(name, 0)) for name in ("used_memory", "maxmemory")}
    per_node = client.info("memory", target_nodes=RedisCluster.PRIMARIES)
    return {name: sum(float(i.get(name, 0)) for i in per_node.values()) for name in ("used_memory", "maxmemory")}


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
