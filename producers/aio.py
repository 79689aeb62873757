"""``AsyncClient``: the Python API for asyncio services, method for method the same as ``Client``.

Reads (status, events, result) use redis.asyncio and never block the loop. Enqueueing goes
through Celery's producer, which is synchronous: it runs in a worker thread
(``asyncio.to_thread``), so validation errors are still raised in the caller before anything
is enqueued.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from moonq.connect import resilient_redis
from moonq.errors import JobNotFound, JobTimeout
from moonq.eventlog import decode_record, parse_entries
from moonq.keys import Keys
from moonq.settings import ClientSettings
from moonq.wire import DEFAULT_PRIORITY, TERMINAL_STATUSES, ChatCompletion, ChatRequest, Event
from producers.client import Client, _is_terminal_message, outcome_of
from producers.fanout import Fanout


class AsyncClient:
    """An asyncio connection to one moonq queue. Use ``async with AsyncClient() as client``."""

    def __init__(
        self, redis_url: str | None = None, *, settings: ClientSettings | None = None, max_connections: int = 50
    ) -> None:
        self._sync = Client(redis_url, settings=settings)
        self.settings = self._sync.settings
        self.keys: Keys = self._sync.keys
        # Bounded, blocking, retrying (moonq/connect.py); followers share one pub/sub connection
        # (producers/fanout.py), so a follower rides out a Redis restart and many fit in a small pool.
        self.redis = resilient_redis(self.settings.redis_url, max_connections=max_connections)
        self.fanout = Fanout(self.redis)

    async def submit(
        self,
        request: dict[str, Any] | ChatRequest,
        *,
        priority: int = DEFAULT_PRIORITY,
        idempotency_key: str | None = None,
    ) -> AsyncJob:
        """As ``Client.submit``."""
        job = await asyncio.to_thread(self._sync.submit, request, priority=priority, idempotency_key=idempotency_key)
        return AsyncJob(self, job.id)

    async def submit_many(
        self, requests: Iterable[dict[str, Any] | ChatRequest], *, priority: int = DEFAULT_PRIORITY
    ) -> list[AsyncJob]:
        """As ``Client.submit_many``."""
        jobs = await asyncio.to_thread(self._sync.submit_many, list(requests), priority=priority)
        return [AsyncJob(self, job.id) for job in jobs]

    def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, job_id)

    async def failed(self, limit: int = 100) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._sync.failed, limit)

    async def retry(self, job_id: str) -> AsyncJob:
        job = await asyncio.to_thread(self._sync.retry, job_id)
        return AsyncJob(self, job.id)

    async def close(self) -> None:
        await self.fanout.close()
        await self.redis.aclose()
        await asyncio.to_thread(self._sync.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncJob:
    """A handle on one job; every method reads Redis afresh."""

    def __init__(self, client: AsyncClient, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"<AsyncJob {self.id}>"

    async def record(self) -> dict[str, str]:
        rec = decode_record(await self.client.redis.hgetall(self.client.keys.job(self.id)))
        if not rec:
            raise JobNotFound(self.id)
        return rec

    async def status(self) -> str:
        return (await self.record())["status"]

    async def events(self, *, after_seq: int = 0, poll_s: float = 1.0) -> AsyncIterator[Event]:
        """Every event from the first (replayed), then live; ends after the terminal one."""
        await self.record()
        keys, r = self.client.keys, self.client.redis
        last = after_seq
        async with self.client.fanout.watch(keys.events(self.id)) as inbox:
            # Subscribed first, so the log holds everything up to now. After that, live messages are
            # taken as they come while each is the next seq; a gap or a quiet poll re-reads the log.
            read_log = True
            while True:
                if read_log:
                    read_log = False
                    for event in parse_entries(await r.xrange(keys.log(self.id), min=f"{last + 1}-0", max="+") or []):
                        last = event.seq
                        yield event
                        if event.terminal:
                            return
                while inbox.messages and not read_log:
                    event = Event.model_validate_json(inbox.messages.popleft())
                    if event.seq == last + 1:
                        last = event.seq
                        yield event
                        if event.terminal:
                            return
                    elif event.seq > last + 1:
                        read_log = True  # missed one (reconnect): the log has it
                if read_log:
                    continue
                inbox.ready.clear()
                try:
                    async with asyncio.timeout(poll_s):  # no task per wait, unlike wait_for
                        await inbox.ready.wait()
                except TimeoutError:
                    read_log = True
                    if not await r.exists(keys.job(self.id)):
                        return

    async def result(self, timeout: float | None = None) -> ChatCompletion:
        """As ``Job.result``: the completion, or ``JobFailed`` / ``JobCancelled`` / ``JobTimeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        async with self.client.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(self.client.keys.events(self.id))
            while True:
                rec = await self.record()
                if rec["status"] in TERMINAL_STATUSES:
                    return outcome_of(self.id, rec)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise JobTimeout(f"job {self.id} still {rec['status']} after {timeout}s")
                wait = min(1.0, left) if left is not None else 1.0
                msg = await pubsub.get_message(timeout=wait)
                while msg is not None and not _is_terminal_message(msg["data"]):
                    msg = await pubsub.get_message(timeout=wait)

    async def cancel(self) -> bool:
        """As ``Job.cancel``."""
        return await asyncio.to_thread(self.client._sync.job(self.id).cancel)
