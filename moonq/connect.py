"""The redis.asyncio client moonq's long-lived processes share: bounded, blocking, retrying.

Used by a worker node (``worker/loop.py``) and by ``AsyncClient``. The pool is bounded and
*blocking*: a burst of commands queues for a connection instead of redis-py's default pool
raising ``MaxConnectionsError`` past 100 (Redis runs commands one at a time anyway). Commands
retry with backoff for about a minute, so a Redis restart is ridden out, not raised.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Longest wait for a free connection of the pool before a command fails (and is retried).
POOL_WAIT_S = 30.0


def resilient_redis(url: str, *, max_connections: int, **connection_kwargs: Any) -> Redis:
    """A client on ``url`` with at most ``max_connections`` connections; extra kwargs go to each connection."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=5.0), retries=20),
        # OSError: a refused connect while Redis restarts is a socket error before redis-py wraps it.
        retry_on_error=[RedisConnectionError, RedisTimeoutError, OSError],
        **connection_kwargs,
    )
    return Redis.from_pool(pool)
