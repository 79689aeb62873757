"""In-flight leases against a real Redis: a lease whose renewals came too late is counted again.

Each ``Node`` is a limiter on its own asyncio loop, in its own thread, with its own Redis client,
as in another process. Stalling a node's loop (a blocking call on it, as CPU-bound work or a
long GC pause would) stops its renewals for longer than the lease TTL: the lease expires and
the next acquire anywhere sweeps it, while the call it stands for is still running.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import pytest
import redis
from redis.asyncio import Redis

from worker.limiter_state import LimiterKeys
from worker.ratelimit import Lease, Limiter, Limits

T = TypeVar("T")
TTL_S = 0.6


class Node:
    """A started limiter on a loop of its own."""

    def __init__(self, redis_url: str, prefix: str, limits: Limits) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.redis = Redis.from_url(redis_url)
        self.limiter = Limiter(self.redis, prefix, limits, lease_ttl_s=TTL_S, waiter_ttl_s=1.0)
        self.call(self._start())

    async def _start(self) -> None:
        self.limiter.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
        return self.submit(coro).result(timeout=timeout_s)

    def acquire(self) -> Future[Lease]:
        return self.submit(self.limiter.acquire(1, priority=5, enqueued_at_s=time.time()))

    def stall(self, seconds: float) -> None:
        """Block the node's loop for ``seconds``: nothing on it runs, renewals included."""
        self.loop.call_soon_threadsafe(time.sleep, seconds)

    def close(self) -> None:
        self.call(self.limiter.stop())
        self.call(self.redis.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


@pytest.fixture
def nodes(redis_url: str) -> Iterator[tuple[Node, Node, LimiterKeys]]:
    prefix = f"ls{uuid.uuid4().hex[:8]}"
    limits = Limits(max_inflight=2)
    holder, other = Node(redis_url, prefix, limits), Node(redis_url, prefix, limits)
    yield holder, other, LimiterKeys.for_prefix(prefix)
    holder.close()
    other.close()


def wait_for(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_lease_that_expired_mid_call_is_counted_again_and_the_cap_holds(
    nodes: tuple[Node, Node, LimiterKeys], r: redis.Redis
) -> None:
    holder, other, keys = nodes
    lease = holder.acquire().result(timeout=5)  # the holder's call is running from here on
    holder.stall(3 * TTL_S)
    time.sleep(1.5 * TTL_S)  # its renewals are late by more than the TTL: the lease expired
    first = other.acquire().result(timeout=5)  # an acquire sweeps the expired lease (1 of 2 counted)
    assert r.zscore(keys.inflight, lease.id) is None
    # The holder's loop runs again: its next renewal adds the lease of the call still running.
    assert wait_for(lambda: r.zscore(keys.inflight, lease.id) is not None, 5.0), "the lease never came back"
    assert r.zcard(keys.inflight) == 2
    # Two calls run, and the cap is two: a third waits, through several renewals, until one ends.
    third = other.acquire()
    time.sleep(3 * TTL_S)
    assert not third.done(), "granted a third call while two were in flight"
    holder.call(holder.limiter.release(lease, used_tokens=None))
    third.result(timeout=5)
    other.call(other.limiter.release(first, used_tokens=None))
    # Released leases stay released: the renewals that follow do not bring them back.
    time.sleep(TTL_S)
    assert r.zscore(keys.inflight, lease.id) is None and r.zscore(keys.inflight, first.id) is None
