"""The Redis transport the worker consumes with: kombu's, minus restore-on-close, with a tag per
delivery and Redis' clock for redelivery.

When the broker connection breaks, kombu's channel close tries to push every in-flight message
back to its queue, through the connection that just broke; in kombu 5.7 that raises inside
Celery's connection-error handler and the whole node stops ("Unrecoverable error"), so a Redis
restart would take every node down with it. moonq does not need that restore: a running job keeps
its message's unacked entry fresh (keepalive.py), acks it over whatever connection is current when
it ends, and a dead node's messages come back through the visibility timeout. So the node keeps
running its jobs through a Redis restart and reconnects.

Acks are cheaper too: an ack frees its prefetch slot at once, and the unacked entries of every ack
of one turn of the consumer loop are removed together in the next turn, in one round trip (``QoS.ack``).

Two more changes make redelivery exact:

- **A tag per delivery.** kombu gives a message its delivery tag when it is published and keeps it
  when it restores the message to the queue, so a redelivered copy has the tag of the first
  delivery. A stale first delivery (a paused node that wakes up) would then ack, and so delete, the
  new delivery's unacked entry; if the new node died, nothing would bring the message back. Here
  every delivery gets a fresh tag as it is received: an ack or reject touches only its own entry.
- **One clock.** kombu scores the unacked index with the local clock and restores entries older
  than the local clock minus the visibility timeout, while heartbeats (keepalive.py) score with
  Redis' ``TIME``. A node whose clock runs 15 s ahead would restore every live message on each
  sweep. Here both the score and the sweep use Redis' clock (the local clock plus an offset
  measured against ``TIME`` every ``CLOCK_REFRESH_S``).

On a Sentinel-managed broker (``redis+sentinel://``, moonq/redisurl.py) the node uses
``SentinelTransport``: the same channel on a Sentinel pool, which asks the sentinels for the primary
at every connect, so the reconnect after a failover finds the new one. kombu's own Sentinel channel
reads the sentinels from the broker URL's failover list (``sentinel://a;sentinel://b``), but on a
connection error kombu switches to the next entry of that list *and* to the transport its scheme
names, kombu's plain Sentinel transport, without any of the above. So the node is given one broker
URL and the whole list in the transport option ``sentinels`` (worker/app.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from queue import Empty
from typing import Any

import orjson
import redis.sentinel
from kombu.asynchronous import get_event_loop
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import RedisError

from moonq.redisurl import SentinelConnection, SentinelSSLConnection

log = logging.getLogger("moonq.worker")

# How often a process re-measures its clock against Redis' (a clock that drifts or is stepped is
# followed within this long).
CLOCK_REFRESH_S = 10.0
# Messages a receive takes from the list its BRPOP answered from, beyond that one (``Channel._drain``).
DRAIN_MAX = 16

# Delivery tags of the messages this process has received and not yet acknowledged or rejected, running or
# not: the heartbeat keeps their unacked entries fresh (worker/keepalive.py). A received task can wait for a
# free pool thread (after a broker reconnect the new channel prefetches again while the old deliveries still
# run), and a message whose entry went stale meanwhile was restored to another node while this one was
# about to run it: the nemesis saw such second deliveries. Added and discarded from the consumer thread,
# copied from the loop's (set operations are atomic under the GIL).
_held: set[str] = set()


def held_tags() -> set[str]:
    """A copy of the tags this process holds (``_held``)."""
    return _held.copy()


class RedisClock:
    """The local clock corrected to Redis' ``TIME`` (the clock heartbeats and the claim use)."""

    def __init__(self) -> None:
        self._offset_s = 0.0
        self._measured_at = float("-inf")

    def now(self, client: Any) -> float:
        local = time.monotonic()
        if local - self._measured_at >= CLOCK_REFRESH_S:
            self._measure(client)
        return time.time() + self._offset_s

    def _measure(self, client: Any) -> None:
        try:
            before = time.time()
            seconds, micros = client.time()
            after = time.time()
        except (RedisError, OSError):
            log.warning("could not read Redis' clock; using the last offset (%.3f s)", self._offset_s)
            return
        # Redis answered somewhere between before and after: take the midpoint.
        self._offset_s = seconds + micros / 1e6 - (before + after) / 2
        self._measured_at = time.monotonic()


class PlainPayload(dict[str, Any]):
    """A queued message that holds only JSON's own types (every message moonq sends), read by orjson."""


def _payload(raw: bytes) -> Any:
    """A queued message as kombu reads it. kombu's JSON (the stdlib's, a Python hook called for every
    object, for its typed values: ``{"__type__": ..., "__value__": ...}``) and its re-encoding for the
    unacked entry (``QoS.append``) were about 4% of a busy node's samples (py-spy, 200 jobs at once); a
    message without typed values is read by orjson, which gives the same values."""
    if b'"__type__"' not in raw:
        try:
            return PlainPayload(orjson.loads(raw))
        except orjson.JSONDecodeError:  # NaN, an integer past 64 bits: JSON that kombu's reader takes
            pass
    return loads(bytes_to_str(raw))  # type: ignore[no-untyped-call]


def _entry(message: Any) -> str:
    """The unacked entry of a received message: its payload (its delivery tag in it), exchange and routing
    key, as kombu writes it; by orjson for a plain payload (the same JSON, without kombu's spaces)."""
    delivery = message.delivery_info
    value = [message._raw, delivery["exchange"], delivery["routing_key"]]
    if type(message._raw) is PlainPayload:
        with contextlib.suppress(orjson.JSONEncodeError):  # a value kombu or Celery added that is not JSON's
            return orjson.dumps(value).decode()
    return dumps(value)  # type: ignore[no-untyped-call,no-any-return]


class QoS(kombu_redis.QoS):
    """kombu's ack emulation, scored and swept on Redis' clock (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.clock = RedisClock()
        self.held: list[tuple[str, str]] | None = None  # unacked entries a receive holds until it ends
        self.acked: list[str] = []  # tags acknowledged whose unacked entries are not removed yet (``ack``)

    def append(self, message: Any, delivery_tag: str) -> None:
        # As kombu's, with the score on Redis' clock; inside a receive (``Channel._brpop_read``) the
        # entries of all the messages it takes are written together as it ends (``flush``).
        entry = (delivery_tag, _entry(message))
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]
        _held.add(delivery_tag)
        if self.held is not None:
            self.held.append(entry)
        else:
            self._write([entry])

    def flush(self) -> None:
        """Write the unacked entries held during a receive, in one round trip; the receive is over."""
        self._write_held()
        self.held = None

    def _write_held(self) -> None:
        if self.held:
            entries, self.held = self.held, []
            self._write(entries)

    # A message refused while it is being received (Celery acks an unreadable one at once) is acked, or
    # rejected back to its queue, inside the receive: its entry must be written first, or the ack would
    # leave the entry behind it (to come back after the visibility timeout) and a requeue would find
    # nothing to put back.
    def ack(self, delivery_tag: str) -> None:
        # The slot is free at once (kombu's bookkeeping); the entry's removal waits for the consumer loop's
        # next turn, which removes every entry acknowledged meanwhile in one round trip. One round trip per
        # ack cost the consumer thread ~245 us of CPU and ~1.4 ms blocked (a burst of 200 job ends: ~0.3 s
        # of not receiving). An entry whose removal is lost (the node dies first, the connection breaks)
        # comes back after the visibility timeout and its delivery finds the job ended, as a lost ack did.
        self._write_held()
        virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]
        self.acked.append(delivery_tag)
        if len(self.acked) == 1:
            hub = get_event_loop()
            # Deferred only from inside the running consumer loop (its thread): a hub that is not running
            # here (none at all, or one another component left set) would never get to the removal.
            if hub is not None and getattr(hub, "_loop_thread", None) == threading.get_ident():
                hub.call_soon(self.remove_acked)  # type: ignore[no-untyped-call]
            else:
                self.remove_acked()

    def remove_acked(self) -> None:
        """Remove the unacked entries of the tags acknowledged since the last call, in one round trip."""
        tags, self.acked = self.acked, []
        if not tags:
            return
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()
        except (AttributeError, RedisError, OSError):
            # AttributeError: the channel was closed by a broker reconnect (its connection is None).
            log.warning(
                "acks of %d messages lost with their connection; redelivery will find the jobs ended", len(tags)
            )

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self._write_held()
        super().reject(delivery_tag, requeue)  # type: ignore[no-untyped-call]

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        self._write_held()
        super().restore_by_tag(tag, client, leftmost)  # type: ignore[no-untyped-call]

    def _write(self, entries: list[tuple[str, str]]) -> None:
        with self.channel.conn_or_acquire() as client:
            now = self.clock.now(client)
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {tag: now for tag, _ in entries})
            pipe.hset(self.unacked_key, mapping=dict(entries))
            pipe.execute()

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        # As kombu's, with the visibility deadline on Redis' clock.
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % (interval or 1):
            return
        with self.channel.conn_or_acquire() as client:
            ceil = self.clock.now(client) - self.visibility_timeout
            try:
                with kombu_redis.Mutex(client, self.unacked_mutex_key, self.unacked_mutex_expire):
                    visible = client.zrange(
                        self.unacked_index_key,
                        ceil,
                        0,
                        desc=True,
                        byscore=True,
                        offset=num and start,
                        num=num,
                        withscores=True,
                    )
                    for tag, _score in visible or []:
                        self.restore_by_tag(tag, client)
            except kombu_redis.MutexHeld:
                pass


class DeliveryMessage(virtual.Message):
    """A received message with a delivery tag of its own (module docstring): the unacked entry, the
    ack and the keepalive of this delivery all use it, and no other delivery's."""

    def __init__(self, payload: dict[str, Any], channel: Any = None, **kwargs: Any) -> None:
        payload["properties"]["delivery_tag"] = uuid.uuid4().hex
        super().__init__(payload, channel=channel, **kwargs)  # type: ignore[no-untyped-call]


class Channel(kombu_redis.Channel):
    QoS = QoS
    do_restore = False

    Message = DeliveryMessage
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        # kombu builds a new redis-py client for every append, ack and sweep, and the constructor is
        # costly (a few per job showed as 3% of a busy node's CPU). One on the channel's pool serves them
        # all: a redis-py client is safe across threads (each command takes its own pooled connection).
        if asynchronous:
            return super()._create_client(asynchronous)  # type: ignore[no-untyped-call]
        pool = self.pool
        if self._shared_client is None or self._shared_client.connection_pool is not pool:
            self._shared_client = super()._create_client(False)  # type: ignore[no-untyped-call]
        return self._shared_client

    def _brpop_read(self, **options: Any) -> bool:
        # As kombu's (5.7), and then the drain below.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # A broken connection: disconnect, so the next poll reconnects.
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            key, item = dest__item
            dest = key.decode().rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            self.qos.held = []
            try:
                self.connection._deliver(_payload(item), dest)
                self._drain(key.decode(), dest)
            finally:
                self.qos.flush()
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu's own None
            self._flush_brpop_reauth()  # type: ignore[no-untyped-call]

    def _drain(self, key: str, dest: str) -> None:
        """Take up to ``DRAIN_MAX`` more messages from the list a BRPOP just answered from, in one RPOP.

        kombu receives one message per BRPOP, and each receive waits for the node's busy event loop to
        hand over the GIL: 200 jobs queued at once by ``submit_many`` reached a node's consumer over 1.1 s,
        over 0.4 s with the drain (timed per job, one run each, a loaded machine). Only while the node keeps
        at least half its prefetch
        free after the drain (a nearly full node takes one at a time, in its tenants' turns:
        moonq/broker.py). A message popped here and lost with the node before it is recorded unacked is
        the case a BRPOP has too: the sweeper sends its job again (worker/sweeper.py).
        """
        qos = self.qos
        room = qos.can_consume_max_estimate()
        count = DRAIN_MAX if room is None else min(DRAIN_MAX, room - qos.prefetch_count // 2)
        if count <= 0:
            return
        try:
            with self.conn_or_acquire() as client:
                items = client.rpop(key, count)  # a str: kombu's key prefixing would take bytes' repr
        except (RedisError, OSError):
            log.warning("could not take more messages from %s; the next receive will", dest, exc_info=True)
            return
        for item in items or ():
            self.connection._deliver(_payload(item), dest)

    def close(self) -> None:
        # Acks whose entries are still to be removed (``QoS.ack``) go before the pools are disconnected.
        if not self.closed and self._qos is not None:
            self._qos.remove_acked()
        super().close()  # type: ignore[no-untyped-call]

    # A job that outlives a broker reconnect acks through the channel it came from, which the
    # reconnect closed (its connection is None: kombu raises AttributeError, Celery calls that
    # "Unrecoverable" and stops the node). The ack is not needed for correctness: the message is
    # redelivered after the visibility timeout and the claim skips a job that already ended.
    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        _held.discard(delivery_tag)  # also when the ack is lost: its entry then goes stale and comes back
        try:
            super().basic_ack(delivery_tag, multiple)  # type: ignore[no-untyped-call]
        except (AttributeError, RedisError, OSError):
            log.warning("ack of %s lost with its connection; redelivery will find the job ended", delivery_tag)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        _held.discard(delivery_tag)
        try:
            super().basic_reject(delivery_tag, requeue)  # type: ignore[no-untyped-call]
        except (AttributeError, RedisError, OSError):
            log.warning(
                "reject of %s lost with its connection; it comes back after the visibility timeout", delivery_tag
            )


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """moonq's channel (above) on a Sentinel pool: ``master_name``, ``sentinel_kwargs`` and
    ``sentinels`` ([host, port] pairs) come from the transport options moonq/broker.py and
    worker/app.py derive from the Sentinel URL."""

    # kombu sets each option named here as an attribute of the channel (mypy: one name longer than the base's).
    from_transport_options = (*kombu_redis.SentinelChannel.from_transport_options, "sentinels")  # type: ignore[assignment]
    # Reconnects go through the sentinels on every path (moonq/redisurl.py says why).
    connection_class = SentinelConnection
    connection_class_ssl = SentinelSSLConnection  # type: ignore[assignment]  # kombu's is the same mix, unfixed
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        # As kombu's, with the sentinels from the transport option rather than the URL's failover list.
        if not self.sentinels:
            return super()._sentinel_managed_pool(asynchronous)  # type: ignore[no-untyped-call]
        params = self._connparams(asynchronous)  # type: ignore[no-untyped-call]
        params.pop("host", None)
        params.pop("port", None)
        manager = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            [(host, int(port)) for host, port in self.sentinels],
            min_other_sentinels=getattr(self, "min_other_sentinels", 0),
            sentinel_kwargs=getattr(self, "sentinel_kwargs", None),
            **params,
        )
        # kombu closes these managers' connections to the sentinels with the channel's pools.
        if asynchronous:
            self._async_sentinel_manager = manager
        else:
            self._sentinel_manager = manager
        if self.master_name is None:
            raise ValueError("the 'master_name' transport option must be set")
        credentials = {k: params[k] for k in ("username", "password") if k in params}
        return manager.master_for(self.master_name, redis.Redis, **credentials).connection_pool  # type: ignore[no-untyped-call]


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
