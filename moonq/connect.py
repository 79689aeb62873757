"""The redis.asyncio client moonq's long-lived processes share: bounded, blocking, retrying.

Used by a worker node (``worker/loop.py``) and by ``AsyncClient``. The pool is bounded and
*blocking*: a burst of commands queues for a connection instead of redis-py's default pool
raising ``MaxConnectionsError`` past 100 (Redis runs commands one at a time anyway). Commands
retry with backoff for about a minute, so a Redis restart is ridden out, not raised.

On a Sentinel URL (moonq/redisurl.py) the pool is the same, plus Sentinel's: every connect asks the
sentinels for the primary, so the retries of a command that failed with the old primary reach the
new one once the sentinels have promoted it.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from moonq.redisurl import AsyncSentinelPool, async_redis, is_sentinel_url

# Longest wait for a free connection of the pool before a command fails (and is retried).
POOL_WAIT_S = 30.0
# OSError: a refused connect while Redis restarts is a socket error before redis-py wraps it.
RETRY_ON = [RedisConnectionError, RedisTimeoutError, OSError]


class BlockingSentinelConnectionPool(AsyncSentinelPool, BlockingConnectionPool):
    """redis-py's Sentinel pool (the primary's address from the sentinels at each connect) with the
    blocking pool's bound (a burst waits for a connection instead of failing)."""


def resilient_redis(url: str, *, max_connections: int, **connection_kwargs: Any) -> Redis:
    """A client on ``url`` with at most ``max_connections`` connections; extra kwargs go to each connection."""
    if is_sentinel_url(url):
        return async_redis(
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
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=5.0), retries=20),
        retry_on_error=RETRY_ON,
        **connection_kwargs,
    )
    return Redis.from_pool(pool)
