"""``AsyncClient``: the Python API for asyncio services, method for method the same as ``Client``.

Reads (status, events, result) use redis.asyncio and never block the loop; following and
waiting decide as ``Client`` does (``producers/follow.py``), and share one pub/sub connection
per client (``producers/fanout.py``). Writes go through the same ``Submitter`` as ``Client``'s:
a submit that is one script call on the data Redis (the broker too, no idempotency key, no budget)
runs on the caller's loop; the rest (Celery's producer is synchronous) in a worker thread
(``asyncio.to_thread``). Validation errors are raised in the caller before anything is enqueued.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, Unpack

from pydantic import BaseModel

from moonq.connect import resilient_redis
from moonq.errors import JobNotFound
from moonq.eventlog import parse_entries
from moonq.keys import Keys
from moonq.record import JobField, JobRecord, decode_hash, fields_to_read, picked, visible
from moonq.redisurl import sync_redis
from moonq.settings import ClientSettings
from moonq.wire import DEFAULT_PRIORITY, ChatCompletion, ChatRequest, Event
from producers.fanout import Fanout
from producers.follow import Follower, ResultWait
from producers.submitter import COMMANDS_LUA, JobOptions, SubmitItem, Submitter

# A request whose strings add up to more characters than this is prepared in a worker thread (``submit``).
INLINE_REQUEST_CHARS = 256 * 1024
# A handle this young, from a submit that wrote its record, names a record that exists: a record lives
# until result_ttl_s (60 s at least) after its job ends, and nothing else deletes it. Its first
# ``events()`` skips the read that would raise JobNotFound (one round trip per streamed gateway request).
FRESH_HANDLE_S = 30.0


def text_size(value: Any) -> int:
    """The characters of the strings in a request (a dict or a model), counted without copying them: a
    100 MB base64 image is one string, so this costs its structure, not its bytes. Stops counting past
    ``INLINE_REQUEST_CHARS``."""
    total, stack = 0, [value]
    while stack and total <= INLINE_REQUEST_CHARS:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, BaseModel):
            stack.extend(item.__dict__.values())
            stack.extend((item.__pydantic_extra__ or {}).values())
    return total


class AsyncClient:
    """An asyncio connection to one moonq queue. Use ``async with AsyncClient() as client``."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        settings: ClientSettings | None = None,
        max_connections: int = 50,
        tenant: str | None = None,
    ) -> None:
        if settings is None:
            settings = ClientSettings(redis_url=redis_url) if redis_url else ClientSettings()
        self.settings = settings
        self.tenant = tenant  # as ``Client(tenant=...)``
        self.keys: Keys = settings.keys
        # Bounded, blocking, retrying (moonq/connect.py); followers share one pub/sub connection
        # (producers/fanout.py), so a follower rides out a Redis restart and many fit in a small pool.
        self.redis = resilient_redis(settings.redis_url, max_connections=max_connections)
        self.fanout = Fanout(self.redis)
        # The writes' own synchronous connection, used from worker threads only.
        self._sync_redis = sync_redis(settings.redis_url)
        self._submitter = Submitter(settings, self._sync_redis)
        self._commands = self.redis.register_script(COMMANDS_LUA)

    async def submit(
        self,
        request: dict[str, Any] | ChatRequest,
        *,
        priority: int = DEFAULT_PRIORITY,
        idempotency_key: str | None = None,
        **options: Unpack[JobOptions],
    ) -> AsyncJob:
        """As ``Client.submit``."""
        options["tenant"] = tenant = options.get("tenant") or self.tenant
        # A small request whose enqueue is one script call on the data Redis (its broker, no idempotency
        # key, no budget) is checked, built and pushed on this loop. Through a worker thread it queued
        # behind the loop's other work for the GIL: in a gateway streaming 200 answers, a submit's push
        # reached Redis ~0.5 s after the call. A large one (validating and serializing 100 MB takes
        # seconds) and every other submit run in a worker thread, as before.
        if self._submitter.direct and idempotency_key is None and text_size(request) <= INLINE_REQUEST_CHARS:
            job, config = self._submitter.prepare(request, priority, idempotency_key, options)
            if self._submitter.pushes_directly(job, config):
                return await self._push(job, tenant)
        submit = functools.partial(
            self._submitter.submit, priority=priority, idempotency_key=idempotency_key, **options
        )
        return AsyncJob(self, await asyncio.to_thread(submit, request), tenant)

    async def _push(self, job: Any, tenant: str | None) -> AsyncJob:
        """The one-script enqueue of a prepared job (``Submitter.push_commands``), from this loop."""
        try:
            await self._commands(args=self._submitter.push_commands([job]))
        except Exception:  # refused (a Redis out of memory refuses the lot): nothing is left of it
            await asyncio.to_thread(self._submitter.forget, [job])
            raise
        return AsyncJob(self, job.id, tenant, fresh=True)

    async def submit_many(
        self,
        requests: Iterable[dict[str, Any] | ChatRequest | SubmitItem],
        *,
        priority: int = DEFAULT_PRIORITY,
        **options: Unpack[JobOptions],
    ) -> list[AsyncJob]:
        """As ``Client.submit_many``."""
        options["tenant"] = tenant = options.get("tenant") or self.tenant
        submit_many = functools.partial(self._submitter.submit_many, priority=priority, **options)
        return [AsyncJob(self, job_id, tenant) for job_id in await asyncio.to_thread(submit_many, list(requests))]

    def job(self, job_id: str, tenant: str | None = None) -> AsyncJob:
        """A handle for an existing job, seen as ``tenant`` (default: the client's; None: any)."""
        return AsyncJob(self, job_id, tenant or self.tenant)

    async def failed(self, limit: int = 100, tenant: str | None = None) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._submitter.failed, limit, tenant or self.tenant)

    async def retry(self, job_id: str, tenant: str | None = None) -> AsyncJob:
        scope = tenant or self.tenant
        return AsyncJob(self, await asyncio.to_thread(self._submitter.retry, job_id, scope), scope)

    async def close(self) -> None:
        await self.fanout.close()
        await self.redis.aclose()
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        self._submitter.close()
        self._sync_redis.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncJob:
    """A handle on one job; every method reads Redis afresh."""

    def __init__(self, client: AsyncClient, job_id: str, tenant: str | None = None, *, fresh: bool = False) -> None:
        self.client = client
        self.id = job_id
        self.tenant = tenant  # whose jobs this handle may see (None: any)
        # Until then the record is known to exist and be this tenant's (``FRESH_HANDLE_S``).
        self._known_until = time.monotonic() + FRESH_HANDLE_S if fresh else 0.0

    def __repr__(self) -> str:
        return f"<AsyncJob {self.id}>"

    async def record(self, fields: Iterable[str] | None = None) -> dict[str, str]:
        """As ``Job.record``."""
        r, key, names = self.client.redis, self.client.keys.job(self.id), fields_to_read(fields)
        rec = decode_hash(await r.hgetall(key)) if names is None else picked(names, await r.hmget(key, names))
        if not rec.get(JobField.STATUS) or not visible(rec, self.tenant):
            raise JobNotFound(self.id)
        return rec

    async def status(self) -> str:
        return (await self.record((JobField.STATUS,)))[JobField.STATUS]

    async def events(self, *, after_seq: int = 0, poll_s: float = 1.0) -> AsyncIterator[Event]:
        """As ``Job.events``: every event from the first (replayed), then live; ends after the terminal one."""
        if time.monotonic() >= self._known_until:
            await self.record((JobField.STATUS,))  # JobNotFound rather than nothing; not the request (up to 100 MB)
        keys, r = self.client.keys, self.client.redis
        async with self.client.fanout.watch(keys.events(self.id)) as inbox:
            follower = Follower(after_seq, confirmation_coming=inbox.confirmation_coming)
            while not follower.done:
                if follower.needs_log:
                    entries = await r.xrange(keys.log(self.id), min=follower.log_min)
                    for event in follower.take_log(parse_entries(entries or [])):
                        yield event
                    continue
                item = await inbox.get(poll_s)
                if item is None:
                    follower.quiet(job_exists=bool(await r.exists(keys.job(self.id))))
                else:
                    for event in follower.take_live(item):
                        yield event

    async def result(self, timeout: float | None = None) -> ChatCompletion:
        """As ``Job.result``: the completion, or ``JobFailed`` / ``JobCancelled`` / ``JobTimeout``."""
        wait = ResultWait(self.id, timeout, time.monotonic())
        async with self.client.fanout.watch(self.client.keys.events(self.id)) as inbox:
            while True:
                rec = JobRecord.from_redis(await self.client.redis.hgetall(self.client.keys.job(self.id)))
                if rec is not None and self.tenant is not None and rec.tenant != self.tenant:
                    raise JobNotFound(self.id)
                step = wait.step(rec, time.monotonic())
                if isinstance(step, ChatCompletion):
                    return step
                await inbox.wait_for(wait.wakes, step)

    async def cancel(self) -> bool:
        """As ``Job.cancel``."""
        return await asyncio.to_thread(self.client._submitter.cancel, self.id, self.tenant)
