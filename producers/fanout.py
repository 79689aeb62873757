"""One pub/sub connection for every job an ``AsyncClient`` follows.

A gateway streaming a thousand jobs must not hold a thousand Redis connections (nor run into
the pool's limit). ``Fanout`` subscribes each followed job's channel on one shared connection
and hands each message to that job's followers' inboxes. A follower takes a message only if
its ``seq`` is the next one it expects; on a gap, or after a quiet spell, it reads the replay
log instead, so nothing is lost or repeated even when the connection drops and comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

log = logging.getLogger("moonq.producers")

# How long a follower waits for Redis to confirm its subscription before reading the log anyway
# (it then relies on its quiet-poll for anything published in between).
CONFIRM_TIMEOUT_S = 5.0


class Inbox:
    """The messages of one channel for one follower, in arrival order; ``ready`` is set on arrival."""

    def __init__(self) -> None:
        self.messages: deque[bytes] = deque()
        self.ready = asyncio.Event()

    def put(self, data: bytes) -> None:
        self.messages.append(data)
        self.ready.set()


class Fanout:
    """Shared subscriptions: ``async with fanout.watch(channel) as inbox`` receives its messages."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._wakers: dict[str, set[Inbox]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}

    @contextlib.asynccontextmanager
    async def watch(self, channel: str) -> AsyncIterator[Inbox]:
        """Subscribed to ``channel`` (confirmed by Redis) for the block; its messages land in the inbox."""
        wake = Inbox()
        wakers = self._wakers.setdefault(channel, set())
        first = not wakers
        wakers.add(wake)
        try:
            if first:
                self._confirmed[channel] = asyncio.Event()
                await self._ensure_pubsub().subscribe(channel)
                self._ensure_reader()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._confirmed[channel].wait(), CONFIRM_TIMEOUT_S)
            yield wake
        finally:
            wakers.discard(wake)
            if not wakers and self._wakers.get(channel) is wakers:
                del self._wakers[channel]
                self._confirmed.pop(channel, None)
                if self._pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await self._pubsub.unsubscribe(channel)

    @property
    def channels(self) -> int:
        """Channels subscribed now."""
        return len(self._wakers)

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
                msg = await pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                # redis-py reconnects and resubscribes on the next read; followers poll meanwhile.
                log.warning("event fan-out lost its Redis connection; reconnecting", exc_info=True)
                await asyncio.sleep(0.5)
                continue
            except RuntimeError:  # nothing subscribed yet (connection not set up)
                await asyncio.sleep(0.05)
                continue
            if msg is None:
                continue
            channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else str(msg["channel"])
            if msg["type"] == "subscribe":
                confirmed = self._confirmed.get(channel)
                if confirmed is not None:
                    confirmed.set()
            elif msg["type"] == "message":
                for inbox in self._wakers.get(channel, ()):
                    inbox.put(msg["data"])

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
