"""AsyncClient: the same API as Client, awaitable, against the same real worker."""

from __future__ import annotations

import asyncio
import inspect
import threading
import uuid
from typing import Any

import pytest

from moonq.request import validate_request
from producers import AsyncClient, AsyncJob, Client, InvalidRequest, Job, JobFailed, JobNotFound
from producers.aio import INLINE_REQUEST_CHARS, text_size
from producers.submitter import Submitter
from worker.settings import Settings

REQ = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Async, please."}]}


def public(cls: type) -> set[str]:
    return {n for n, _ in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}


def test_method_parity() -> None:
    assert public(AsyncClient) == public(Client)
    assert public(AsyncJob) == public(Job)
    for name in public(AsyncJob) - {"events"}:
        assert inspect.iscoroutinefunction(getattr(AsyncJob, name)), name
    assert inspect.isasyncgenfunction(AsyncJob.events)


def test_submit_follow_result_status(settings: Settings, worker: Any) -> None:
    async def main() -> tuple[list[Any], Any, str, Any]:
        async with AsyncClient(settings=settings) as client:
            job = await client.submit(REQ, priority=1)
            events = [e async for e in job.events()]
            result = await job.result(timeout=10)
            status = await job.status()
            late = [e async for e in client.job(job.id).events(after_seq=2)]
            return events, result, status, late

    events, result, status, late = asyncio.run(main())
    assert events[-1].type == "completed" and status == "succeeded"
    assert "".join((e.delta or {}).get("content") or "" for e in events) == result.choices[0].message.content
    assert late == events[2:]
    with Client(settings=settings) as sync:  # the same job, seen from the sync client
        assert sync.job(events[0].job_id).result() == result


def test_errors_bulk_idempotency_cancel_and_dead_letters(
    fresh_prefix: Settings, settings: Settings, worker: Any
) -> None:
    async def main() -> None:
        async with AsyncClient(settings=fresh_prefix) as client:
            with pytest.raises(InvalidRequest, match="messages: is required"):
                await client.submit({"model": "m"})
            with pytest.raises(JobNotFound):
                await client.job("nope").status()
            queued = await client.submit(REQ)  # nobody consumes this prefix
            assert await queued.cancel() is True and await queued.status() == "cancelled"
            assert [e.type async for e in queued.events()] == ["cancelled"]
            a = await client.submit(REQ, idempotency_key="same")
            b = await client.submit(REQ, idempotency_key="same")
            assert a.id == b.id
            many = await client.submit_many([REQ] * 5)
            assert len({j.id for j in many}) == 5
        async with AsyncClient(settings=settings) as live:  # the embedded worker's queue
            failing = await live.submit({**REQ, "sim": {"script": ["quota", "ok"], "key": uuid.uuid4().hex}})
            with pytest.raises(JobFailed):
                await failing.result(timeout=10)
            assert failing.id in [row["id"] for row in await live.failed()]
            again = await live.retry(failing.id)
            assert (await again.result(timeout=10)).choices[0].message.content

    asyncio.run(main())


def test_a_small_submit_is_pushed_from_the_loop_and_a_large_one_from_a_thread(
    fresh_prefix: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small plain request is checked, built and pushed on the caller's loop (no worker thread to queue
    # behind); one whose strings are large is validated and serialized in a worker thread, so a 100 MB
    # request never stalls a gateway's loop. Both are enqueued the same way.
    threads: list[str] = []
    real = Submitter.submit

    def spy(self: Submitter, *args: Any, **kwargs: Any) -> str:
        threads.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Submitter, "submit", spy)
    small = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "hi"}]}
    large = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "x" * (INLINE_REQUEST_CHARS + 1)}]}
    assert text_size(small) < INLINE_REQUEST_CHARS < text_size(validate_request(large))

    async def main() -> list[str]:
        async with AsyncClient(settings=fresh_prefix) as client:
            jobs = [await client.submit(small), await client.submit(large)]
            return [await job.status() for job in jobs]

    assert asyncio.run(main()) == ["queued", "queued"]
    assert len(threads) == 1 and threads[0] != threading.main_thread().name  # the large one, off the loop
