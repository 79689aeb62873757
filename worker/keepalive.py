"""Proof of life for the jobs a process is running, so that only dead nodes' jobs move.

Every ``heartbeat_interval_s`` one pipelined script call per group of jobs (moonq/keys.py) refreshes,
for each running job, the job record's ``heartbeat_at`` (only while this process still owns it) and
the score of its broker message in kombu's ``unacked_index``. Kombu redelivers a message whose score
is older than the visibility timeout, so a live job's message never is, however long the job runs
(Celery issue #5935), while a killed node's messages come back within the timeout instead of
Redis' default hour.

The unacked index exists only on a Redis broker. When the broker is a different Redis from
``REDIS_URL``, the index is refreshed there, by its own client. On RabbitMQ there is nothing to
refresh: it keeps a delivery as long as the consumer's connection lives and hands it to another
node when that connection drops; only the job records are beaten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from moonq.keys import group_of
from moonq.record import record_lua
from moonq.redisurl import async_redis
from moonq.settings import is_redis_url
from worker.delivery import Delivery
from worker.job import JobContext
from worker.transport import held_tags

log = logging.getLogger("moonq.worker")

# Field names come from moonq/record.py (``$owner``, ``$heartbeat_at``, ``$cancel_requested``).
# KEYS[1] the active-jobs index of one group, KEYS[2..n+1] job hashes of that group, KEYS[n+2] (optional)
# kombu's unacked_index zset (when the broker is this Redis). ARGV[1..n] owner tokens, ARGV[n+1..2n]
# delivery tags ('' when not from a broker), ARGV[2n+1..3n] job ids. One call per group, so each touches
# one hash slot (the unacked index only rides along on a single Redis, never on a cluster).
# For each delivery that still owns its job: the record's heartbeat and the job's place in the active
# index. For every delivery, parked ones too: its unacked entry (XX: never re-adds an acked one).
# Returns the positions (1-based) of owned jobs whose cancel was requested, so that a cancel whose
# announcement this node missed (its listener was reconnecting) still stops the job within a beat.
KEEPALIVE_LUA = record_lua("""
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_s = tonumber(t[1]) + tonumber(t[2]) / 1e6
local n = #ARGV / 3
local cancelled = {}
for i = 1, n do
  if redis.call('HGET', KEYS[i + 1], $owner) == ARGV[i] then
    redis.call('HSET', KEYS[i + 1], $heartbeat_at, now_ms)
    redis.call('ZADD', KEYS[1], 'XX', tonumber(t[1]), ARGV[2 * n + i])
    if redis.call('HGET', KEYS[i + 1], $cancel_requested) == '1' then
      cancelled[#cancelled + 1] = i
    end
  end
  if ARGV[n + i] ~= '' then
    redis.call('ZADD', KEYS[n + 2], 'XX', now_s, ARGV[n + i])
  end
end
return cancelled
""")


def cancel_deliveries(ctx: JobContext, job_id: str) -> None:
    """Stop the deliveries of ``job_id`` that own it; parked ones learn the outcome at their next claim."""
    for delivery in ctx.deliveries.of_job(job_id):
        if delivery.owns:
            delivery.task.cancel()


async def keepalive(ctx: JobContext, metrics_url: Callable[[], str | None]) -> None:
    """Beat for every delivery of this process, and announce the node's /metrics URL, forever."""
    script = ctx.redis.register_script(KEEPALIVE_LUA)
    unacked_index = f"{ctx.keys.broker_prefix}unacked_index"
    broker_url, redis_url = ctx.settings.broker_url, ctx.settings.redis_url
    redis_broker = is_redis_url(broker_url)
    # Tags go into the script when the broker is the same Redis; a separate broker Redis gets its own client.
    broker = async_redis(broker_url) if redis_broker and broker_url != redis_url else None
    with contextlib.suppress(RedisError, OSError):  # else the first beat's NOSCRIPT loads it
        await ctx.redis.script_load(script.script)
    try:
        while True:
            await asyncio.sleep(ctx.settings.heartbeat_interval_s)
            await _announce(ctx, metrics_url())
            deliveries = list(ctx.deliveries)
            tags = [str(d.tag or "") if redis_broker else "" for d in deliveries]
            # Received, not running yet (waiting for a pool thread): their entries are kept fresh too.
            waiting = held_tags() - set(tags) if redis_broker else set()
            if not deliveries and not waiting:
                continue
            try:
                if deliveries:
                    await _beat(ctx, script, deliveries, tags if broker is None else [], unacked_index)
                refresh = (waiting | set(tags) if broker is not None else waiting) - {""}
                if refresh:
                    target = broker or ctx.redis
                    seconds, micros = await target.time()  # its clock, as kombu's sweep there (transport.py)
                    await target.zadd(unacked_index, dict.fromkeys(refresh, seconds + micros / 1e6), xx=True)
            except NoScriptError:  # Redis restarted, or a shard never saw it: load it (everywhere), beat next time
                await ctx.redis.script_load(script.script)
            except (RedisError, OSError):
                log.warning("heartbeat failed; will try again", exc_info=True)
    finally:
        if broker is not None:
            await broker.aclose()


async def _beat(
    ctx: JobContext, script: AsyncScript, deliveries: list[Delivery], tags: list[str], unacked_index: str
) -> None:
    """One ``KEEPALIVE_LUA`` call per group of jobs, pipelined; ``tags``: the deliveries' tags when the
    broker is this Redis (else empty); cancels the deliveries whose job's cancel was requested."""
    by_group: dict[int, list[int]] = {}
    for i, d in enumerate(deliveries):
        by_group.setdefault(group_of(d.job_id), []).append(i)
    async with ctx.redis.pipeline(transaction=False) as pipe:
        for group, members in by_group.items():
            keys = [ctx.keys.active_in(group), *(ctx.keys.job(deliveries[i].job_id) for i in members)]
            owners = [deliveries[i].owner if deliveries[i].owns else "" for i in members]
            ours = [tags[i] for i in members] if tags else [""] * len(members)
            if any(ours):
                keys.append(unacked_index)
            args = [*owners, *ours, *(deliveries[i].job_id for i in members)]
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)  # cluster pipelines refuse Scripts
        replies = await pipe.execute()
    for members, cancelled in zip(by_group.values(), replies, strict=True):
        for position in cancelled or []:
            delivery = deliveries[members[int(position) - 1]]
            if delivery.owns and not delivery.task.done():
                log.info("event=cancel_seen_by_heartbeat job_id=%s", delivery.job_id)
                delivery.task.cancel()


async def _announce(ctx: JobContext, url: str | None) -> None:
    """``P:nodes`` zset: metrics URL -> last beat (unix s); readers drop entries older than 30 s."""
    if url is None:
        return
    now = time.time()
    try:
        async with ctx.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(ctx.keys.nodes, {url: now})
            pipe.zremrangebyscore(ctx.keys.nodes, "-inf", now - 3600)
            pipe.expire(ctx.keys.nodes, 3600)
            await pipe.execute()
    except RedisError:
        log.warning("could not announce the node", exc_info=True)
