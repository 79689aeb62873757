"""Deliveries: each receipt of a job's message in this process, and its claim on the job.

Delivery is at least once, so one job can have several deliveries at a time: a redelivered copy
while a paused node still runs the first one, or a copy re-sent by the sweeper. Everything that
acts on "the job running here" acts on one delivery, never on a job id alone:

- ``Deliveries`` holds them by their owner token. The keepalive beats each one (the job record
  only for the delivery that owns the job; the broker's unacked entry for every one, parked
  ones included), a cancel reaches every delivery of the job, and a shutdown hands each back.
- ``claim`` makes a delivery the job's owner (``CLAIM_LUA``), or says why it must not run: the
  job ended, is gone, was cancelled, or a live owner runs it (then the delivery waits, parked,
  in case that owner dies).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from moonq.keys import Keys
from moonq.record import DEFAULT_TENANT, record_lua

# Field and status names come from moonq/record.py (``$field`` / ``$status`` placeholders).
# KEYS[1] job hash, KEYS[2] the active-jobs index (zset job id -> last sign of life, unix s), KEYS[3]
# the deliveries stream (the job's first start hands off a ``started`` webhook if its record asks).
# ARGV[1] owner token, ARGV[2] stale_ms: an owner whose heartbeat is older than this is presumed
# dead, ARGV[3] job id, ARGV[4] '1' when the message carried no request (a ``JobTicket``): the claim then
# returns the record's envelope too.
# Returns {verdict, attempt, seq, idempotency key name or ''}, and for 'run', 'takeover' and 'cancel' also
# the job's tenant ('' = the default; its budget, worker/budgets.py) and the envelope ('' unless asked for).
# Verdicts: 'run' (now owned by ARGV[1]),
# 'takeover' (the same, but the last owner died mid-attempt), 'cancel' (cancel requested before it
# started), 'busy' (a live owner is running it: this copy must not run it twice), 'gone' (no record:
# the job ended and its record expired, or was never recorded; a message is never a reason to
# recreate a job, or a cancelled or finished job would come back), or the terminal status it
# already has ('succeeded' / 'failed' / 'cancelled').
CLAIM_LUA = record_lua("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local status = redis.call('HGET', KEYS[1], $status)
if not status then return {'gone', 0, 0, ''} end
local seq = tonumber(redis.call('HGET', KEYS[1], $seq) or '0')
local idem = redis.call('HGET', KEYS[1], $idem_key) or ''
if $is_terminal then
  return {status, 0, seq, idem}
end
if status == $running or status == $retrying then
  local beat = tonumber(redis.call('HGET', KEYS[1], $heartbeat_at) or '0')
  if now - beat < tonumber(ARGV[2]) and redis.call('HGET', KEYS[1], $owner) ~= ARGV[1] then
    return {'busy', 0, seq, idem}
  end
end
local attempt = redis.call('HINCRBY', KEYS[1], $attempt, 1)
redis.call('HSET', KEYS[1], $owner, ARGV[1], $heartbeat_at, now)
redis.call('ZADD', KEYS[2], tonumber(t[1]), ARGV[3])
local envelope = ''
if ARGV[4] == '1' then envelope = redis.call('HGET', KEYS[1], $envelope) or '' end
if redis.call('HGET', KEYS[1], $cancel_requested) == '1' then
  return {'cancel', attempt, seq, idem, redis.call('HGET', KEYS[1], $tenant) or '', envelope}
end
redis.call('HSET', KEYS[1], $status, $running)
if redis.call('HEXISTS', KEYS[1], $started_at) == 0 then
  redis.call('HSET', KEYS[1], $started_at, tonumber(t[1]) + tonumber(t[2]) / 1e6)
  local events = ',' .. (redis.call('HGET', KEYS[1], $webhook_events) or '') .. ','
  if string.find(events, ',started,', 1, true) then
    redis.call('XADD', KEYS[3], '*', 'kind', 'webhook', 'job', ARGV[3], 'event', 'started', 'attempt', attempt)
  end
end
local tenant = redis.call('HGET', KEYS[1], $tenant) or ''
-- Its last owner died mid-attempt (running, or retrying, with a stale heartbeat): a takeover.
if status ~= $queued then return {'takeover', attempt, seq, idem, tenant, envelope} end
return {'run', attempt, seq, idem, tenant, envelope}
""")


@dataclass
class Delivery:
    """One delivery of one job in this process."""

    job_id: str
    owner: str  # this delivery's token; fences its writes once it owns the job
    task: asyncio.Task[Any]
    tag: str | None  # the broker's delivery tag (on a Redis broker, kept from redelivery by keepalive)
    owns: bool = False  # False while parked behind another live owner, True once claimed


class Deliveries:
    """The deliveries in this process, by owner token."""

    def __init__(self) -> None:
        self._by_owner: dict[str, Delivery] = {}

    def add(self, delivery: Delivery) -> None:
        self._by_owner[delivery.owner] = delivery

    def remove(self, delivery: Delivery) -> None:
        self._by_owner.pop(delivery.owner, None)

    def of_job(self, job_id: str) -> list[Delivery]:
        return [d for d in self._by_owner.values() if d.job_id == job_id]

    def __iter__(self) -> Iterator[Delivery]:
        return iter(list(self._by_owner.values()))

    def __len__(self) -> int:
        return len(self._by_owner)


@dataclass(frozen=True)
class Claim:
    verdict: str
    attempt: int
    seq: int
    idempotency_key: str  # the Redis key of the job's idempotency key ('' when it has none)
    tenant: str = DEFAULT_TENANT  # the job's tenant (read for the verdicts that run it)
    envelope: str = ""  # the record's envelope JSON, when the claim was asked for it


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


async def claim(
    script: AsyncScript,
    redis: Redis,
    keys: Keys,
    delivery: Delivery,
    *,
    stale_s: float,
    wait_s: float,
    envelope: bool = False,
    stopping: Callable[[], bool] = lambda: False,
) -> Claim:
    """Claim the job for ``delivery``; while another live node runs it, wait parked (it may die, or finish).

    ``envelope``: also read the record's envelope (the message was a ``JobTicket``, without the request).
    ``stopping``: true once the node is shutting down; a parked delivery then stops waiting (raising
    ``asyncio.CancelledError``), also when the shutdown's cancel was lost in a Redis call (moonq/cancel.py).
    """
    args: list[str | int] = [delivery.owner, int(stale_s * 1000), delivery.job_id, "1" if envelope else ""]
    while True:
        verdict, attempt, seq, idem, *rest = await script(
            keys=[keys.job(delivery.job_id), keys.active_for(delivery.job_id), keys.deliveries_for(delivery.job_id)],
            args=args,
            client=redis,
        )
        if _text(verdict) != "busy":
            named = _text(rest[0]) if rest else ""
            stored = _text(rest[1]) if len(rest) > 1 else ""
            return Claim(_text(verdict), int(attempt), int(seq), _text(idem), named or DEFAULT_TENANT, stored)
        if stopping():
            raise asyncio.CancelledError
        await asyncio.sleep(wait_s)
