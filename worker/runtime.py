"""The per-process runtime: one asyncio loop that holds every in-flight job of the process.

Celery's thread pool hands each job to a thread; the thread submits the job's coroutine to
this loop and waits for it. Waiting threads cost only memory, while the loop multiplexes all
upstream streams and Redis writes over shared connection pools. The loop also listens for
cancel announcements and cancels the matching job's task.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from typing import Any

from redis.asyncio import Redis

from producers.eventlog import APPEND_LUA
from producers.wire import JobEnvelope
from worker.runner import CLAIM_LUA, JobContext, Outcome, run_job
from worker.settings import Settings
from worker.upstream import build_client

log = logging.getLogger("moonq.worker")


class Runtime:
    """Start with ``start()``; ``run(envelope)`` from any thread; ``stop()`` at shutdown."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="moonq-loop", daemon=True)
        self.ctx: JobContext | None = None
        self._listener: asyncio.Task[None] | None = None

    def start(self) -> Runtime:
        self._thread.start()
        self.ctx = asyncio.run_coroutine_threadsafe(self._open(), self.loop).result()
        return self

    async def _open(self) -> JobContext:
        redis = Redis.from_url(self.settings.redis_url, health_check_interval=30)
        ctx = JobContext(
            settings=self.settings,
            keys=self.settings.keys,
            redis=redis,
            http=build_client(self.settings),
            append=redis.register_script(APPEND_LUA),
            claim=redis.register_script(CLAIM_LUA),
            running={},
        )
        self._listener = asyncio.create_task(self._listen_for_cancels(ctx))
        return ctx

    async def _listen_for_cancels(self, ctx: JobContext) -> None:
        while True:
            try:
                pubsub = ctx.redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(ctx.keys.cancel)
                async for msg in pubsub.listen():
                    task = ctx.running.get(msg["data"].decode())
                    if task is not None:
                        task.cancel()
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis went away: resubscribe; runner re-checks the flag on claim
                log.warning("cancel listener lost its connection; resubscribing", exc_info=True)
                await asyncio.sleep(1.0)

    def submit(self, envelope: dict[str, Any]) -> Future[Outcome]:
        assert self.ctx is not None, "Runtime.start() first"
        return asyncio.run_coroutine_threadsafe(run_job(self.ctx, JobEnvelope.model_validate(envelope)), self.loop)

    def run(self, envelope: dict[str, Any]) -> Outcome:
        """Run one job to its outcome, blocking the calling (pool) thread."""
        return self.submit(envelope).result()

    def stop(self) -> None:
        if self.ctx is not None:
            asyncio.run_coroutine_threadsafe(self._close(self.ctx), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()

    async def _close(self, ctx: JobContext) -> None:
        if self._listener is not None:
            self._listener.cancel()
        await ctx.http.aclose()
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


def stop_all() -> None:
    with _lock:
        for rt in _runtimes.values():
            rt.stop()
        _runtimes.clear()
