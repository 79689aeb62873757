"""The redis.asyncio client moonq's long-lived processes share: bounded, blocking, retrying.

Used by a worker node (``worker/loop.py``) and by ``AsyncClient``. The pool is bounded and
*blocking*: a burst of commands queues for a connection instead of redis-py's default pool
raising ``MaxConnectionsError`` past 100 (Redis runs commands one at a time anyway). Commands
retry with backoff for about a minute, so a Redis restart is ridden out, not raised.

On a Sentinel URL (moonq/redisurl.py) the pool is the same, plus Sentinel's: every connect asks the
sentinels for the primary, so the retries of a command that failed with the old primary reach the
new one once the sentinels have promoted it.

On a Cluster URL the client is redis-py's asyncio ``RedisCluster``: it follows MOVED/ASK
redirects and, after a connection error, reloads the slot map and tries again (a failover is
found that way), up to the Retry's count of times. It is not the pool above: the bound is per
node (``max_connections`` connections to each primary, a sharded pub/sub subscription holding
one of them) and redis-py does not block there: a command past it fails at once with
``MaxConnectionsError``. So the client here is ``GatedRedisCluster``: its commands and pipelines
wait at a gate of ``max_connections - PUBSUB_RESERVE`` at a time, which keeps every node within the
bound (a command or a pipeline holds at most one connection per node) and makes a burst queue, as
the blocking pool does. redis-py 8.1 takes only the count from the Retry, not its backoff, so the
retries come back to back and a node that stays down fails a command within seconds, not a minute.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from moonq.redisurl import AsyncSentinelPool, async_redis, is_cluster_url, is_sentinel_url, with_driver_info

# Longest wait for a free connection of the pool before a command fails (and is retried).
POOL_WAIT_S = 30.0
# OSError: a refused connect while Redis restarts is a socket error before redis-py wraps it.
RETRY_ON = [RedisConnectionError, RedisTimeoutError, OSError]


class BlockingSentinelConnectionPool(AsyncSentinelPool, BlockingConnectionPool):
    """redis-py's Sentinel pool (the primary's address from the sentinels at each connect) with the
    blocking pool's bound (a burst waits for a connection instead of failing)."""


class HiredisPacking:
    """A connection whose commands are packed by hiredis (C) rather than redis-py's Python loop: the same
    bytes, 1.8 us instead of 13 us for an event append of 14 arguments (the node packs one per relayed
    fragment). A command hiredis does not take as is (a multi-word name such as ``CONFIG GET``, or an
    argument of another type) goes through redis-py's own."""

    def pack_command(self, *args: Any) -> list[bytes]:
        head = args[0]
        if not (isinstance(head, str) and " " in head) and not (isinstance(head, bytes) and b" " in head):
            try:
                return [hiredis.pack_command(args)]
            except (TypeError, ValueError):
                pass
        packed: list[bytes] = super().pack_command(*args)  # type: ignore[misc]
        return packed


def with_hiredis_packing(pool: Any) -> Any:
    """``pool``, its connections (made from now on) packing with hiredis (``HiredisPacking``)."""
    base = pool.connection_class
    if not issubclass(base, HiredisPacking):
        pool.connection_class = type(f"Hiredis{base.__name__}", (HiredisPacking, base), {})
    return pool


# Connections per node left to pub/sub (a gateway's shard subscriptions, a node's cancel listener).
PUBSUB_RESERVE = 2


class GatedRedisCluster(RedisCluster):
    """redis-py's asyncio cluster client whose commands and pipelines wait their turn (module docstring)."""

    gate: asyncio.Semaphore | None = None
    _first: asyncio.Lock | None = None
    _ready = False

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if not self._ready:
            await self._initialize_once()
        if self.gate is None:
            return await super().execute_command(*args, **kwargs)
        async with self.gate:
            return await super().execute_command(*args, **kwargs)

    async def _initialize_once(self) -> None:
        # redis-py 8.1 initializes a fresh cluster client inside the first commands; many first commands
        # at once each began it and dropped connections another was writing on (AttributeError on a
        # None writer, seen in tests/test_cluster_url.py under load). One initialize, before any command.
        if self._first is None:
            self._first = asyncio.Lock()
        async with self._first:
            if not self._ready:
                await self.initialize()
                self._ready = True

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        return _GatedPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py builds its own


class _GatedPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        gate = cast(GatedRedisCluster, self.cluster_client).gate
        if gate is None:
            return await super().execute(raise_on_error, allow_redirections)
        async with gate:
            return await super().execute(raise_on_error, allow_redirections)


def resilient_redis(url: str, *, max_connections: int, **connection_kwargs: Any) -> Redis:
    """A client on ``url`` with at most ``max_connections`` connections (on a Cluster URL: to each
    node, see above); extra kwargs go to each connection."""
    if is_cluster_url(url):
        # No retry_on_error: RedisCluster retries its own list of errors (connection, timeout, cluster
        # down, slot not covered), reloading the slot map before each try; the Retry gives the count.
        client = async_redis(
            url,
            cluster_class=GatedRedisCluster,
            max_connections=max_connections,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=60),
            **connection_kwargs,
        )
        cast(GatedRedisCluster, client).gate = asyncio.Semaphore(max(1, max_connections - PUBSUB_RESERVE))
        return client
    if is_sentinel_url(url):
        sentinel = async_redis(
            url,
            connection_pool_class=BlockingSentinelConnectionPool,
            max_connections=max_connections,
            timeout=POOL_WAIT_S,
            # A failover takes a few seconds (down-after plus the election): retrying at least once a
            # second finds the new primary soon after its promotion; 60 tries still ride out a minute.
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=60),
            retry_on_error=RETRY_ON,
            **connection_kwargs,
        )
        with_hiredis_packing(sentinel.connection_pool)
        return sentinel
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=5.0), retries=20),
        retry_on_error=RETRY_ON,
        **with_driver_info(connection_kwargs),
    )
    return Redis.from_pool(with_hiredis_packing(pool))
