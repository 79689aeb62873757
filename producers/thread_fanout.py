"""One pub/sub connection for every job a ``Client`` follows or waits for, from any number of threads.

The threaded counterpart of ``producers/fanout.py``: a service following a hundred jobs from a
hundred threads holds one Redis pub/sub connection, not a hundred. One background daemon thread,
started on first use and stopped by ``close``, owns that connection: it alone subscribes,
unsubscribes and reads (a redis-py ``PubSub`` is not safe to share between threads), and hands
each message to its channel's inboxes. Watchers only say which channels they want; the reader
catches up with that between two reads, at most ``READ_SLICE_S`` apart.

Every ``subscribe`` confirmation - the first, and the ones redis-py's resubscription brings after
a reconnect - puts a ``RESYNC`` in the channel's inboxes, so followers refill from the replay log
(``producers/follow.py``) what the connection may have missed.

On a Redis Cluster the channels are shard channels (``SSUBSCRIBE``), held by redis-py's
``ClusterPubSub`` on one connection per primary, read in turn (moonq/keys.py, producers/fanout.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis.client import PubSub
from redis.exceptions import RedisError

from moonq.redisurl import is_cluster_client
from producers.follow import RESYNC, Delivery, deliver

log = logging.getLogger("moonq.producers")

# Longest a read blocks before the reader applies new (un)subscriptions: the most a new watcher's
# subscription waits. Messages themselves are handed over as soon as they arrive.
READ_SLICE_S = 0.02
# Pause after the connection failed, before reading (and so reconnecting) again.
RECONNECT_PAUSE_S = 0.5
# How long ``close`` waits for the reader to finish its last read.
STOP_WAIT_S = 2.0


class ThreadInbox:
    """One watcher's deliveries of one channel, in arrival order; safe to fill from another thread."""

    def __init__(self) -> None:
        self._items: deque[Delivery] = deque()
        self._arrived = threading.Condition(threading.Lock())

    def put(self, item: Delivery) -> None:
        with self._arrived:
            deliver(self._items, item)
            self._arrived.notify()

    def get(self, timeout_s: float) -> Delivery | None:
        """The next delivery, or None when none came within ``timeout_s``."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: bool(self._items), timeout_s):
                return None
            return self._items.popleft()

    def wait_for(self, wanted: Callable[[Delivery], bool], timeout_s: float) -> bool:
        """Take deliveries until one is ``wanted`` (True) or ``timeout_s`` passes (False)."""
        until = time.monotonic() + timeout_s
        while (left := until - time.monotonic()) > 0:
            item = self.get(left)
            if item is None:
                return False
            if wanted(item):
                return True
        return False


class ThreadFanout:
    """Shared subscriptions: ``with fanout.watch(channel) as inbox`` receives its deliveries."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._sharded = is_cluster_client(client)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a watcher came or went, or close
        self._inboxes: dict[str, set[ThreadInbox]] = {}
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()

    @contextlib.contextmanager
    def watch(self, channel: str) -> Iterator[ThreadInbox]:
        """Subscribed to ``channel`` for the block (from the reader's next turn on); its messages, and a
        ``RESYNC`` once the subscription is confirmed (or renewed after a reconnect), land in the inbox."""
        inbox = ThreadInbox()
        with self._lock:
            self._inboxes.setdefault(channel, set()).add(inbox)
            self._ensure_reader()
            self._changed.notify_all()
        try:
            yield inbox
        finally:
            with self._lock:
                inboxes = self._inboxes.get(channel, set())
                inboxes.discard(inbox)
                if not inboxes:
                    self._inboxes.pop(channel, None)

    @property
    def channels(self) -> int:
        """Channels watched now."""
        with self._lock:
            return len(self._inboxes)

    def close(self) -> None:
        """Stop the reader and close its connection; a later ``watch`` starts them again."""
        with self._lock:
            reader, self._reader = self._reader, None
            self._stop.set()
            self._changed.notify_all()
        if reader is not None:
            reader.join(STOP_WAIT_S)

    def _ensure_reader(self) -> None:  # called holding the lock
        if self._reader is None or not self._reader.is_alive():
            self._stop = threading.Event()
            self._reader = threading.Thread(target=self._run, args=(self._stop,), name="moonq-fanout", daemon=True)
            self._reader.start()

    def _run(self, stop: threading.Event) -> None:
        pubsub = self._redis.pubsub()  # type: ignore[no-untyped-call]
        subscribed: set[str] = set()  # asked of Redis (confirmed or not), as this thread last left it
        try:
            while self._wait_for_work(stop, subscribed):
                with self._lock:
                    wanted = set(self._inboxes)
                try:
                    _reconcile(pubsub, wanted, subscribed, self._sharded)
                    if self._sharded:
                        msg = pubsub.get_sharded_message(timeout=READ_SLICE_S / 4)
                    else:
                        msg = pubsub.get_message(timeout=READ_SLICE_S)
                except (RedisError, OSError):
                    # The next read reconnects, and redis-py resubscribes; its confirmations resync
                    # the followers, who poll the log meanwhile.
                    log.warning("event fan-out lost its Redis connection; reconnecting", exc_info=True)
                    stop.wait(RECONNECT_PAUSE_S)
                    continue
                if msg is not None:
                    self._dispatch(msg, subscribed)
        finally:
            with contextlib.suppress(RedisError, OSError):
                pubsub.close()

    def _wait_for_work(self, stop: threading.Event, subscribed: set[str]) -> bool:
        """Sleep while nothing is watched nor left to unsubscribe; False once told to stop."""
        with self._lock:
            while not stop.is_set() and not self._inboxes and not subscribed:
                self._changed.wait()
            return not stop.is_set()

    def _dispatch(self, msg: dict[str, Any], subscribed: set[str]) -> None:
        raw = msg["channel"]
        channel = raw.decode() if isinstance(raw, bytes) else str(raw)
        if msg["type"] in ("subscribe", "ssubscribe"):
            # A resubscription after a reconnect can bring back a channel given up meanwhile:
            # count it as subscribed, so that the next turn gives it up again.
            subscribed.add(channel)
            item: Delivery = RESYNC
        elif msg["type"] in ("message", "smessage") and isinstance(msg["data"], bytes):
            item = msg["data"]
        else:
            return
        with self._lock:
            for inbox in self._inboxes.get(channel, ()):
                inbox.put(item)


def _reconcile(pubsub: PubSub, wanted: set[str], subscribed: set[str], sharded: bool) -> None:
    """Subscribe what is wanted and not subscribed, unsubscribe the reverse; ``subscribed`` follows
    only what Redis was actually sent (a failed call is tried again on the next turn)."""
    if start := wanted - subscribed:
        if sharded:
            pubsub.ssubscribe(*start)
        else:
            pubsub.subscribe(*start)
        subscribed |= start
    if end := subscribed - wanted:
        if sharded:
            pubsub.sunsubscribe(*end)  # type: ignore[no-untyped-call]
        else:
            pubsub.unsubscribe(*end)  # type: ignore[no-untyped-call]
        subscribed -= end
