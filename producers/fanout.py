"""One pub/sub connection for every job an ``AsyncClient`` follows or waits for.

A gateway streaming a thousand jobs must not hold a thousand Redis connections (nor run into
the pool's limit). ``Fanout`` subscribes each watched job's channel on one shared connection and
hands each message to that channel's inboxes. Every ``subscribe`` confirmation from Redis - the
first one, and the ones redis-py's resubscription brings after a reconnect - puts a ``RESYNC``
in the channel's inboxes: what was published before it may be missing, and the reader refills
from the replay log (``producers/follow.py``), so nothing is lost or repeated when the
connection drops and comes back. ``producers/thread_fanout.py`` is the same for threads.

On a Redis Cluster a job's channel is a shard channel (``SSUBSCRIBE``; moonq/keys.py), held on one
connection per primary by redis-py's ``ClusterPubSub``, which also moves a subscription when its
slot moves. That reader polls the primaries in turn, ``CLUSTER_READ_SLICE_S`` each, so an event
may wait up to that long per primary before it is handed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from moonq.cancel import cancel_and_wait
from moonq.redisurl import is_cluster_client
from producers.follow import RESYNC, Delivery, deliver

log = logging.getLogger("moonq.producers")

# Pause after the shared connection failed, before reading (and so reconnecting) again.
RECONNECT_PAUSE_S = 0.5
# On a Redis Cluster: the longest a read waits on one primary's connection before trying the next.
CLUSTER_READ_SLICE_S = 0.005


class Inbox:
    """One watcher's deliveries of one channel, in arrival order; ``ready`` is set on arrival.

    A follower waits for each of its job's events with a timeout (its quiet poll). One timer serves
    all its waits (as the node's read timeout, worker/upstream.py ``_Silence``): a wait only notes its
    deadline, and the timer, when it fires, either ends the wait or moves on to the later deadline a
    newer wait set. An ``asyncio.timeout`` per wait cost 4.5 us, where the rest of taking an event
    costs about 10 (micro-benchmarks, without network I/O).
    """

    def __init__(self) -> None:
        self.messages: deque[Delivery] = deque()
        self.ready = asyncio.Event()
        # This watch subscribed the channel itself, so the subscription's confirmation (a RESYNC) is on
        # its way to this inbox. A watch that joined a channel already subscribed gets no RESYNC of its own.
        self.confirmation_coming = False
        self._deadline = 0.0  # of the wait in progress (loop time)
        self._timer: asyncio.TimerHandle | None = None

    def put(self, item: Delivery) -> None:
        deliver(self.messages, item)
        self.ready.set()

    async def get(self, timeout_s: float) -> Delivery | None:
        """The next delivery, or None when none came within ``timeout_s``."""
        if not self.messages:
            loop = asyncio.get_running_loop()
            self._deadline = loop.time() + timeout_s
            if self._timer is None:
                self._timer = loop.call_at(self._deadline, self._expire, loop)
            elif self._timer.when() > self._deadline:  # a shorter wait than the one the timer is set for
                self._timer.cancel()
                self._timer = loop.call_at(self._deadline, self._expire, loop)
            self.ready.clear()
            await self.ready.wait()
            if not self.messages:  # the timer ended the wait
                return None
        return self.messages.popleft()

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop.time() < self._deadline:  # a later wait moved the deadline on
            self._timer = loop.call_at(self._deadline, self._expire, loop)
            return
        self._timer = None
        self.ready.set()

    def close(self) -> None:
        """The watch is over: no timer keeps the inbox."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def wait_for(self, wanted: Callable[[Delivery], bool], timeout_s: float) -> bool:
        """Take deliveries until one is ``wanted`` (True) or ``timeout_s`` passes (False)."""
        until = asyncio.get_running_loop().time() + timeout_s
        while (left := until - asyncio.get_running_loop().time()) > 0:
            item = await self.get(left)
            if item is None:
                return False
            if wanted(item):
                return True
        return False


class Fanout:
    """Shared subscriptions: ``async with fanout.watch(channel) as inbox`` receives its deliveries."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._inboxes: dict[str, set[Inbox]] = {}
        self._commands = asyncio.Lock()
        self._sharded = is_cluster_client(redis)

    @contextlib.asynccontextmanager
    async def watch(self, channel: str) -> AsyncIterator[Inbox]:
        """Subscribed to ``channel`` for the block; its messages, and a ``RESYNC`` once the subscription
        is confirmed (or renewed after a reconnect), land in the inbox."""
        inbox = Inbox()
        inboxes = self._inboxes.setdefault(channel, set())
        first = not inboxes
        inbox.confirmation_coming = first
        inboxes.add(inbox)
        try:
            if first:
                # One (un)subscribe at a time: redis-py's PubSub takes a connection from the pool on its
                # first command, and first commands racing each other each took one (120 waiting
                # callers held 50 connections, the whole pool; tests/test_gateway_load.py).
                async with self._commands:
                    pubsub = self._ensure_pubsub()
                    if self._sharded:
                        await self._redis.initialize()  # the slot map, before a shard subscribe (RedisCluster)
                        await pubsub.ssubscribe(channel)
                    else:
                        await pubsub.subscribe(channel)
                self._ensure_reader()
            yield inbox
        finally:
            inbox.close()
            inboxes.discard(inbox)
            if not inboxes and self._inboxes.get(channel) is inboxes:
                del self._inboxes[channel]
                if self._pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        async with self._commands:
                            if self._sharded:
                                await self._pubsub.sunsubscribe(channel)
                            else:
                                await self._pubsub.unsubscribe(channel)

    @property
    def channels(self) -> int:
        """Channels subscribed now."""
        return len(self._inboxes)

    def _ensure_pubsub(self) -> PubSub:
        if self._pubsub is None:
            self._pubsub = self._redis.pubsub()
        return self._pubsub

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name="moonq-fanout")

    async def _read(self) -> None:
        pubsub = self._ensure_pubsub()
        while True:
            try:
                # Blocking read (no per-message timeout to arm): subscribe/unsubscribe from other
                # tasks still go out on the same connection meanwhile.
                msg = await self._next(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                # redis-py reconnects and resubscribes on the next read; its confirmations resync
                # the followers, who poll the log meanwhile.
                log.warning("event fan-out lost its Redis connection; reconnecting", exc_info=True)
                await asyncio.sleep(RECONNECT_PAUSE_S)
                continue
            except RuntimeError:  # nothing subscribed yet (connection not set up)
                await asyncio.sleep(0.05)
                continue
            if msg is not None:
                self._dispatch(msg)

    async def _next(self, pubsub: PubSub) -> dict[str, Any] | None:
        if not self._sharded:
            msg: dict[str, Any] | None = await pubsub.get_message(timeout=None)
            return msg
        if not self._inboxes:
            await asyncio.sleep(CLUSTER_READ_SLICE_S)  # nothing subscribed: the poll would return at once
        msg = await pubsub.get_sharded_message(timeout=CLUSTER_READ_SLICE_S)  # type: ignore[attr-defined]
        return msg

    def _dispatch(self, msg: dict[str, object]) -> None:
        raw = msg["channel"]
        channel = raw.decode() if isinstance(raw, bytes) else str(raw)
        if msg["type"] in ("subscribe", "ssubscribe"):
            for inbox in self._inboxes.get(channel, ()):
                inbox.put(RESYNC)
        elif msg["type"] in ("message", "smessage") and isinstance(msg["data"], bytes):
            for inbox in self._inboxes.get(channel, ()):
                inbox.put(msg["data"])

    async def close(self) -> None:
        if self._reader is not None:
            await cancel_and_wait([self._reader])  # its cancel can be lost in a Redis call (moonq/cancel.py)
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
