"""The sweeper: finds active jobs left with neither a message nor a live owner, and re-sends them.

Redelivery covers a node that dies holding a message. A few paths lose the message itself:
kombu pops a message from the queue before it records it as unacknowledged (a node killed in
between takes it along), a producer dies between recording a job and sending it, and with a
broker apart from the data Redis an acknowledgement can survive while the job's last write is
lost. The job's record then says ``queued`` or ``running`` forever. Every node runs this loop;
one at a time (a lock in Redis) it reads the active-jobs indexes (``P:active:{g}``, moonq/keys.py) for
jobs with no sign of life for ``orphan_after_s`` and decides, per job:

- ended or gone: drop it from the index (nothing to do);
- ``queued`` and never sent: its producer died before sending; send it;
- ``queued`` and sent, on a Redis broker: if no priority list still holds a message as old as the
  job, and no node holds its message unacknowledged (taken, not yet claimed: a node paused just after
  its receive), its message is not in the queue any more (it was popped and never recorded): send it again.
  On RabbitMQ a popped message is never lost (it is acknowledged late), so nothing is done;
- ``running`` or ``retrying`` with a heartbeat older than ``orphan_after_s``: its owner is dead. If its
  message is still unacknowledged in some node's hands (on a Redis broker), redelivery brings it back
  once that entry is ``visibility_timeout_s`` old (the dead owner's entry stops being refreshed; a node
  whose shutdown lost its requeue leaves one behind too): wait for it. Otherwise redelivery did not bring
  it back: send it again.

A re-sent message is a duplicate at worst: the claim runs a job once (worker/delivery.py). The
decision is a pure function (``verdict``); the loop around it does the I/O.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from celery import Celery
from redis.asyncio import Redis
from redis.exceptions import RedisError

from moonq.broker import producer_app, queue_for, queue_lists, queues, send_envelope
from moonq.keys import GROUPS
from moonq.record import SET_IF_EXISTS_LUA, JobField, JobRecord, JobStatus
from moonq.settings import is_redis_url
from moonq.wire import JobEnvelope
from worker.settings import Settings

log = logging.getLogger("moonq.worker")

# Jobs looked at per sweep: a larger backlog of orphans is worked off over several sweeps.
BATCH = 200  # jobs per group per sweep

Verdict = Literal["forget", "send", "wait"]


def verdict(rec: JobRecord | None, *, now_s: float, orphan_after_s: float, oldest_queued_s: float | None) -> Verdict:
    """What the sweeper does with one job that showed no sign of life for ``orphan_after_s``.

    Args:
        rec: the job's record (None: gone).
        now_s: Redis' clock.
        orphan_after_s: how long a job may show no sign of life.
        oldest_queued_s: ``enqueued_at`` of the oldest message still in the job's queue, ``inf``
            when the queue is empty, None when the broker cannot be looked into (RabbitMQ).
    """
    if rec is None or rec.terminal:
        return "forget"
    if rec.status is JobStatus.QUEUED:
        if not rec.sent:
            return "send"
        if oldest_queued_s is None or rec.enqueued_at is None:
            return "wait"
        # Messages leave a priority list oldest first: none as old as this job means its message is gone.
        return "send" if oldest_queued_s > rec.enqueued_at else "wait"
    beat_s = (rec.heartbeat_at or 0) / 1000
    return "send" if now_s - beat_s > orphan_after_s else "wait"


def message_enqueued_at(raw: bytes | str) -> float | None:
    """``enqueued_at`` of the job in a kombu message as the Redis transport stores it (None if unreadable)."""
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return float(args[0]["enqueued_at"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def unacked_job_id(raw: bytes | str) -> str | None:
    """The job id (its Celery task id) of an entry of kombu's unacked hash, ``[message, exchange,
    routing_key]`` (None if unreadable)."""
    try:
        message = json.loads(raw)[0]
        job_id = message["headers"]["id"]
        return job_id if isinstance(job_id, str) else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class Sweeper:
    """One node's sweeping loop (started by worker/loop.py)."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = settings.keys
        self._me = uuid.uuid4().hex
        self._app: Celery | None = None
        self._redis_broker = is_redis_url(settings.broker_url)
        # The queue lists live in the broker's Redis (here only when it is the same one).
        self._broker = redis if settings.broker_url == settings.redis_url else None
        self._set_if_exists = redis.register_script(SET_IF_EXISTS_LUA)
        # Queued jobs whose message looked gone at the last sweep: sent again only if it still looks so.
        # A node that has just popped a message claims the job within milliseconds, so a second look
        # one sweep later tells a lost message from one in a node's hands.
        self.suspects: set[str] = set()
        # The queues this node consumes (its tenants file's). A job of a tenant this node does not know
        # sits in a queue no node of this configuration reads: re-sending it would only pile up copies.
        self._queues = set(queues(settings))
        self._warned: set[str] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                if await self._lead():
                    await self.sweep()
            except (RedisError, OSError):
                log.warning("sweep failed; will try again", exc_info=True)

    async def _lead(self) -> bool:
        ttl_ms = int(self.settings.sweep_interval_s * 900)  # lapses before the next sweep is due
        return bool(await self.redis.set(self.keys.sweep_lock, self._me, nx=True, px=max(ttl_ms, 1)))

    async def sweep(self) -> int:
        """One pass over the jobs silent for ``orphan_after_s``; returns how many were re-sent."""
        seconds, micros = await self.redis.time()
        now_s = seconds + micros / 1e6
        async with self.redis.pipeline(transaction=False) as pipe:
            for group in GROUPS:
                pipe.zrangebyscore(
                    self.keys.active_in(group), "-inf", now_s - self.settings.orphan_after_s, start=0, num=BATCH
                )
            silent: list[list[Any]] = await pipe.execute()
        ids = [x.decode() if isinstance(x, bytes) else str(x) for batch in silent for x in batch]
        if not ids:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self.keys.job(job_id))
            raws = await pipe.execute()
        oldest = await self._oldest_queued()
        sent = 0
        suspects = set()
        waiting: list[str] = []
        taken: list[set[str] | None] = []  # jobs whose message a node holds unacknowledged (read when needed)
        for job_id, raw in zip(ids, raws, strict=True):
            rec = JobRecord.from_redis(raw)
            what = verdict(rec, now_s=now_s, orphan_after_s=self.settings.orphan_after_s, oldest_queued_s=oldest)
            if what == "send" and await self._in_a_nodes_hands(job_id, rec, taken):
                what = "wait"
            if what == "wait":
                waiting.append(job_id)
            elif what == "forget":
                await self.redis.zrem(self.keys.active_for(job_id), job_id)
            elif what == "send" and rec is not None and rec.envelope:
                if queue_for(self.settings, rec.tenant) not in self._queues:
                    self._not_consumed(rec.tenant)
                    continue
                if rec.status is JobStatus.QUEUED and rec.sent and job_id not in self.suspects:
                    suspects.add(job_id)  # look again next sweep
                    continue
                await self._resend(job_id, rec, now_s)
                sent += 1
        await self._looked_at(waiting, now_s)
        self.suspects = suspects
        return sent

    async def _looked_at(self, job_ids: list[str], now_s: float) -> None:
        """Jobs found waiting (queued behind others, or running with a live owner) are not read again
        before ``orphan_after_s``: a sweep reads the oldest ``BATCH`` per group, and a deep queue's
        oldest waiting jobs would otherwise fill every sweep, hiding the orphans behind them."""
        if not job_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.zadd(self.keys.active_for(job_id), {job_id: now_s}, xx=True)
            await pipe.execute()

    def _not_consumed(self, tenant: str) -> None:
        if tenant in self._warned:
            return
        self._warned.add(tenant)
        log.error(
            "event=tenant_not_consumed tenant=%s queue=%s: jobs of this tenant wait in a queue this node does not"
            " consume; give every node the producers' MOONQ_TENANTS_FILE (docs/tenants.md) and restart it",
            tenant[:64],
            queue_for(self.settings, tenant)[:200],
        )

    async def _oldest_queued(self) -> float | None:
        """``enqueued_at`` of the oldest message in any priority list (inf: all empty; None: can't tell)."""
        if not self._redis_broker or self._broker is None:
            return None
        async with self._broker.pipeline(transaction=False) as pipe:
            for name in queue_lists(self.settings):
                pipe.lindex(name, -1)  # kombu pops from the right: the tail is the oldest
            tails: Sequence[Any] = await pipe.execute()
        times = [message_enqueued_at(t) for t in tails if t is not None]
        if any(t is None for t in times):
            return None  # a message we cannot read: do not guess
        return min((t for t in times if t is not None), default=float("inf"))

    async def _in_a_nodes_hands(self, job_id: str, rec: JobRecord | None, taken: list[set[str] | None]) -> bool:
        """Whether the message of a job the verdict would send again is in a node's hands, unacknowledged:
        a queued job's popped, not claimed yet (a node paused right after its receive, or one working
        through a burst it took), or a running job's whose owner died or whose requeue was lost.
        Redelivery brings it back when that entry goes stale; a copy sent now would be a second delivery
        (the nemesis found one: a node's shutdown requeue lost, the job re-sent, then redelivered).
        ``taken``: this sweep's read of the unacked hash, made on first need."""
        if rec is None or rec.terminal or (rec.status is JobStatus.QUEUED and not rec.sent):
            return False
        if not taken:
            taken.append(await self._unacked_jobs())
        if taken[0] is None:  # can't tell (a broker apart): a queued job waits, a dead owner's job is sent
            return rec.status is JobStatus.QUEUED
        return job_id in taken[0]

    async def _unacked_jobs(self) -> set[str] | None:
        """The jobs whose message some node has taken and not acknowledged (kombu's unacked hash, on a
        Redis broker that is this Redis; None: can't tell). Read only when a queued job's message looks gone."""
        if not self._redis_broker or self._broker is None:
            return None
        entries = await self._broker.hvals(f"{self.keys.broker_prefix}unacked")
        # An entry that cannot be read (a hand-made message) holds no job of ours.
        return {job_id for job_id in map(unacked_job_id, entries) if job_id is not None}

    async def _resend(self, job_id: str, rec: JobRecord, now_s: float) -> None:
        assert rec.envelope is not None
        envelope = JobEnvelope.model_validate_json(rec.envelope)
        if self._app is None:
            self._app = producer_app(self.settings)
        await asyncio.to_thread(send_envelope, self._app, self.settings, envelope, None, rec.tenant)
        await self.redis.zadd(self.keys.active_for(job_id), {job_id: now_s}, xx=True)  # not again before orphan_after_s
        if rec.status is JobStatus.QUEUED:
            await self._set_if_exists(keys=[self.keys.job(job_id)], args=[JobField.SENT, "1"])
        log.warning("event=orphan_resent job_id=%s status=%s", job_id, rec.status.value)

    def close(self) -> None:
        if self._app is not None:
            self._app.close()
