"""One attempt at one job: claim it, stream the upstream, relay deltas, record one outcome.

Delivery is at least once, so ``run_job`` is written to be called more than once for the
same job: the claim refuses a job that has already ended, and every write afterwards is
fenced by the attempt's owner token, so a stale attempt cannot add to or end a job that
another attempt owns.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from producers.keys import Keys
from producers.wire import JobEnvelope
from worker.assemble import StreamAssembler
from worker.errors import UpstreamError
from worker.events import EventWriter, Fenced
from worker.settings import Settings
from worker.upstream import stream_chat

log = logging.getLogger("moonq.worker")

# KEYS[1] job hash. ARGV[1] owner token, ARGV[2] now (unix s), ARGV[3] ttl_s, ARGV[4] model,
# ARGV[5] enqueued_at, ARGV[6] envelope JSON (to rebuild a record that expired while queued).
# Returns {verdict, attempt}: 'run' (now owned by ARGV[1]), 'cancel' (a cancel was requested
# before it started), or the terminal status it already has ('succeeded'/'failed'/'cancelled').
CLAIM_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  redis.call('HSET', KEYS[1], 'status', 'queued', 'model', ARGV[4], 'enqueued_at', ARGV[5],
             'seq', 0, 'envelope', ARGV[6])
  status = 'queued'
end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  return {status, 0}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  return {'cancel', attempt}
end
redis.call('HSET', KEYS[1], 'status', 'running')
if redis.call('HEXISTS', KEYS[1], 'started_at') == 0 then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[2])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {'run', attempt}
"""

Outcome = Literal["succeeded", "failed", "cancelled", "skipped"]


@dataclass
class JobContext:
    """What one process shares between the jobs it runs."""

    settings: Settings
    keys: Keys
    redis: Redis
    http: httpx.AsyncClient
    append: AsyncScript
    claim: AsyncScript
    running: dict[str, asyncio.Task[Any]]


async def run_job(ctx: JobContext, envelope: JobEnvelope) -> Outcome:
    """Run one delivery of a job to its outcome (or to ``skipped`` if it already has one)."""
    job_id = envelope.job_id
    owner = uuid.uuid4().hex
    model = str(envelope.request.get("model", ""))
    verdict, attempt = await ctx.claim(
        keys=[ctx.keys.job(job_id)],
        args=[owner, time.time(), ctx.settings.result_ttl_s, model, envelope.enqueued_at, envelope.model_dump_json()],
        client=ctx.redis,
    )
    verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
    writer = EventWriter(ctx.redis, ctx.append, ctx.keys, job_id, owner=owner, ttl_s=ctx.settings.result_ttl_s)
    if verdict == "cancel":
        await _end_cancelled(writer)
        return "cancelled"
    if verdict != "run":
        log.info("job %s already %s; delivery skipped", job_id, verdict)
        return "skipped"
    task = asyncio.current_task()
    assert task is not None
    ctx.running[job_id] = task
    try:
        # A cancel announced between the claim and registering in ``running`` is caught here.
        if await ctx.redis.hget(ctx.keys.job(job_id), "cancel_requested") == b"1":
            raise asyncio.CancelledError
        return await _attempt(ctx, envelope, writer, attempt)
    except asyncio.CancelledError:
        if await ctx.redis.hget(ctx.keys.job(job_id), "cancel_requested") != b"1":
            raise  # the worker is shutting down, not a user's cancel
        await _end_cancelled(writer)
        return "cancelled"
    except Fenced:
        log.warning("job %s: attempt %s lost ownership; it stops writing", job_id, attempt)
        return "skipped"
    finally:
        ctx.running.pop(job_id, None)


async def _attempt(ctx: JobContext, envelope: JobEnvelope, writer: EventWriter, attempt: int) -> Outcome:
    job_id = envelope.job_id
    assembler = StreamAssembler()
    started = time.monotonic()
    try:
        async with asyncio.timeout(ctx.settings.attempt_timeout_s):
            async for chunk in stream_chat(ctx.http, envelope.request):
                for index, delta in assembler.feed(chunk):
                    writer.emit("delta", attempt=attempt, index=index, delta=delta)
        result = assembler.finish()
    except UpstreamError as err:
        await writer.finish(
            "failed", {"status": "failed", "error": err.info(), "finished_at": str(time.time())}, error=err.info()
        )
        log.info("job %s failed attempt=%s type=%s status=%s", job_id, attempt, err.type, err.status)
        return "failed"
    except TimeoutError:
        info = {"type": "timeout", "message": f"attempt exceeded {ctx.settings.attempt_timeout_s}s", "status": None}
        await writer.finish("failed", {"status": "failed", "error": info, "finished_at": str(time.time())}, error=info)
        return "failed"
    await writer.finish(
        "completed",
        {"status": "succeeded", "result": result, "finished_at": str(time.time())},
        attempt=attempt,
        result=result,
    )
    usage = result.get("usage") or {}
    log.info(
        "job %s succeeded model=%s attempt=%s prompt_tokens=%s completion_tokens=%s latency_s=%.3f",
        job_id,
        result.get("model"),
        attempt,
        usage.get("prompt_tokens"),
        usage.get("completion_tokens"),
        time.monotonic() - started,
    )
    return "succeeded"


async def _end_cancelled(writer: EventWriter) -> None:
    try:
        await writer.finish("cancelled", {"status": "cancelled", "finished_at": str(time.time())})
    except Fenced:
        pass  # ended some other way first (e.g. the producer cancelled it while queued)
    log.info("job %s cancelled", writer.job_id)
