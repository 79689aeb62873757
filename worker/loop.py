"""The per-process runtime: one asyncio loop that holds every in-flight job of the process.

Celery's thread pool hands each job to a thread; the thread submits the job's coroutine to
this loop and waits for it. Waiting threads cost only memory, while the loop multiplexes all
upstream streams and Redis writes over shared connection pools. The loop also runs the
process's limiter, the heartbeats of its jobs, one pub/sub listener for cancel
announcements and limiter wake-ups, the sweeper, and the delivery worker that sends the webhooks
and Celery callbacks of ended jobs (worker/deliveries.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import Future
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from moonq.broker import queue_for, set_queue_load
from moonq.cancel import cancel_and_wait
from moonq.connect import resilient_redis
from moonq.eventlog import append_lua
from moonq.tenants import cached_tenants
from moonq.wire import JobEnvelope, JobTicket
from worker.accounts import load_accounts
from worker.deliveries import DeliveryWorker
from worker.delivery import CLAIM_LUA
from worker.delivery_process import DeliveryProcess
from worker.job import JobContext, Outcome, reject_envelope, run_job
from worker.keepalive import cancel_deliveries, keepalive
from worker.ratelimit import Limiter, shares
from worker.settings import Settings
from worker.sink import ScriptSink
from worker.sweeper import Sweeper
from worker.upstream import UpstreamClient
from worker.usage import load_prices

log = logging.getLogger("moonq.worker")


def connect(settings: Settings) -> Redis:
    """The node's client: shared by all its jobs, riding out a Redis restart (moonq/connect.py)."""
    return resilient_redis(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        health_check_interval=30,
        socket_keepalive=True,
    )


class Runtime:
    """Start with ``start()``; ``run(envelope)`` from any thread; ``shutdown()`` then ``stop()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The standard library's loop, not uvloop: under uvloop a write on a connection the peer reset raises
        # RuntimeError, which redis-py neither retries nor wraps, and the node's heartbeat and limiter
        # loops (which ride out RedisError and OSError) stopped for good: the nemesis found it.
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="moonq-loop", daemon=True)
        self.ctx: JobContext | None = None
        self._background: list[asyncio.Task[None]] = []
        self._sweeper: Sweeper | None = None
        self._deliveries: DeliveryWorker | None = None
        self._delivery_process: DeliveryProcess | None = None
        self.metrics_url: str | None = None  # announced in Redis for `moonq top` (keepalive.py)

    def start(self) -> Runtime:
        self._thread.start()
        self.ctx = asyncio.run_coroutine_threadsafe(self._open(), self.loop).result()
        return self

    async def _open(self) -> JobContext:
        redis = connect(self.settings)
        self._sweeper = sweeper = Sweeper(self.settings, redis)
        s = self.settings
        accounts = load_accounts(s)
        limiter = Limiter(
            redis,
            s.prefix,
            s.limits,
            accounts={account.name: account.limits for account in accounts} if s.accounts_file else None,
            tenants=shares(cached_tenants(s.tenants_file)),
            lease_ttl_s=s.lease_ttl_s,
            priority_aging_s=s.priority_aging_s,
            max_wait_s=s.capacity_wait_s or None,
        )
        ctx = JobContext(
            settings=self.settings,
            keys=self.settings.keys,
            redis=redis,
            upstreams={account.name: UpstreamClient(s, account) for account in accounts},
            append=ScriptSink(redis, append_lua(redis)),
            claim=redis.register_script(CLAIM_LUA),
            limiter=limiter,
            policy=self.settings.retry_policy,
            prices=load_prices(self.settings.prices_file),
        )
        limiter.start()
        # The broker consumer takes first from the tenant this node holds least of (moonq/broker.py).
        set_queue_load(lambda: {queue_for(s, tenant): n for tenant, n in limiter.waiting().items()})
        self._background = [
            asyncio.create_task(self._listen(ctx)),
            asyncio.create_task(keepalive(ctx, lambda: self.metrics_url)),
            asyncio.create_task(sweeper.run()),
        ]
        if self.settings.webhook_process:
            self._delivery_process = DeliveryProcess(self.settings).start()
        else:
            self._deliveries = DeliveryWorker(self.settings)
            self._background.append(asyncio.create_task(self._deliveries.run()))
        return ctx

    async def _listen(self, ctx: JobContext) -> None:
        cancel, wake = ctx.keys.cancel, ctx.limiter.wake_channel
        while True:
            try:
                async with ctx.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(cancel, wake)
                    ctx.limiter.wake()  # anything missed while unsubscribed: ask again
                    async for msg in pubsub.listen():
                        if msg["channel"].decode() == wake:
                            ctx.limiter.wake()
                            continue
                        cancel_deliveries(ctx, msg["data"].decode())
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                # Redis went away: resubscribe. A cancel sent meanwhile is still caught: the claim and
                # every retry re-read the job's cancel flag, and so does each heartbeat (keepalive.py).
                log.warning("listener lost its Redis connection; resubscribing", exc_info=True)
                await asyncio.sleep(1.0)

    def submit(self, envelope: Any, delivery_tag: str | None = None) -> Future[Outcome]:
        assert self.ctx is not None, "Runtime.start() first"
        try:
            # moonq's producers send a ticket (the request stays in the record); a hand-made message may
            # carry the request itself (docs/contract.md).
            ticket = isinstance(envelope, dict) and "request" not in envelope
            job = JobTicket.model_validate(envelope) if ticket else JobEnvelope.model_validate(envelope)
        except ValidationError as err:
            # A poison message (another version's envelope, a hand-made one): ended, not redelivered.
            problem = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'envelope'}: {e['msg']}" for e in err.errors())
            return asyncio.run_coroutine_threadsafe(reject_envelope(self.ctx, envelope, problem), self.loop)
        return asyncio.run_coroutine_threadsafe(run_job(self.ctx, job, delivery_tag), self.loop)

    def run(self, envelope: dict[str, Any], delivery_tag: str | None = None) -> Outcome:
        """Run one job to its outcome, blocking the calling (pool) thread."""
        return self.submit(envelope, delivery_tag).result()

    def shutdown(self) -> None:
        """Hand every running job back to the queue now (warm shutdown must not wait for long streams)."""
        if self.ctx is None:
            return
        ctx = self.ctx

        def _cancel_all() -> None:
            ctx.shutting_down = True
            for delivery in ctx.deliveries:
                delivery.task.cancel()

        self.loop.call_soon_threadsafe(_cancel_all)

    def stop(self) -> None:
        if self.ctx is not None:
            asyncio.run_coroutine_threadsafe(self._close(self.ctx), self.loop).result(timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()

    async def _close(self, ctx: JobContext) -> None:
        await cancel_and_wait(self._background)  # moonq/cancel.py: a cancel can be lost in redis-py
        await ctx.limiter.stop()
        with contextlib.suppress(Exception):
            for upstream in ctx.upstreams.values():
                await upstream.aclose()
        if self._sweeper is not None:
            await asyncio.to_thread(self._sweeper.close)
        if self._deliveries is not None:
            with contextlib.suppress(Exception):
                await self._deliveries.aclose()
        if self._delivery_process is not None:
            await asyncio.to_thread(self._delivery_process.stop)
        await ctx.redis.aclose()


_lock = threading.Lock()
_runtimes: dict[int, Runtime] = {}


def runtime_for(settings: Settings) -> Runtime:
    """The process's runtime for these settings, started on first use."""
    with _lock:
        rt = _runtimes.get(id(settings))
        if rt is None:
            rt = _runtimes[id(settings)] = Runtime(settings).start()
        return rt


def stop_for(settings: Settings) -> None:
    """Stop the process's runtime for these settings, if one was started (embedders and tests)."""
    with _lock:
        rt = _runtimes.pop(id(settings), None)
    if rt is not None:
        rt.stop()


def shutdown_all() -> None:
    with _lock:
        for rt in _runtimes.values():
            rt.shutdown()


def stop_all() -> None:
    with _lock:
        for rt in _runtimes.values():
            rt.stop()
        _runtimes.clear()
