"""AsyncClient followers share one pub/sub connection, and a missed message is read from the log."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import redis
from redis.asyncio import Redis

from producers import AsyncClient
from producers.fanout import Fanout, Inbox
from producers.follow import RESYNC
from worker.settings import Settings

REQ = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Fan out, please."}], "stream": True}


def test_many_followers_on_a_small_pool(settings: Settings, worker: Any) -> None:
    """40 jobs followed at once through a client whose pool holds 4 connections."""

    async def main() -> list[list[Any]]:
        async with AsyncClient(settings=settings, max_connections=4) as client:
            jobs = await client.submit_many([REQ] * 40)

            async def follow(job_id: str) -> list[Any]:
                return [e async for e in client.job(job_id).events()]

            streams = await asyncio.wait_for(asyncio.gather(*(follow(j.id) for j in jobs)), 60)
            assert client.fanout.channels == 0  # every subscription given back
            return streams

    for events in asyncio.run(main()):
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert events[-1].type == "completed"
        assert any(e.type == "delta" for e in events)


def _event(job_id: str, seq: int, type: str, **fields: Any) -> str:
    return json.dumps({"seq": seq, "job_id": job_id, "type": type, "ts": time.time(), **fields})


def test_a_gap_in_live_messages_is_filled_from_the_log(fresh_prefix: Settings) -> None:
    """Events 1-3 are in the log but only 3 is published: the follower still yields 1, 2, 3 in order."""
    r = redis.Redis.from_url(fresh_prefix.redis_url)
    keys = fresh_prefix.keys

    async def main() -> list[Any]:
        async with AsyncClient(settings=fresh_prefix) as client:
            job = await client.submit(REQ)  # nobody consumes this prefix: we play the worker
            seen: list[Any] = []

            async def follow() -> None:
                async for event in client.job(job.id).events(poll_s=30):  # no quiet poll to the rescue
                    seen.append(event)

            task = asyncio.create_task(follow())
            while client.fanout.channels == 0:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # subscription confirmed
            for seq, type in ((1, "started"), (2, "delta"), (3, "delta")):
                fields = {"attempt": 1, "index": 0, "delta": {"content": str(seq)}} if type == "delta" else {}
                r.xadd(keys.log(job.id), {"e": _event(job.id, seq, type, **fields)}, id=f"{seq}-0")
            r.publish(keys.events(job.id), _event(job.id, 3, "delta", attempt=1, index=0, delta={"content": "3"}))
            final = _event(job.id, 4, "cancelled")
            r.xadd(keys.log(job.id), {"e": final}, id="4-0")
            r.publish(keys.events(job.id), final)
            await asyncio.wait_for(task, 10)
            return seen

    assert [(e.seq, e.type) for e in asyncio.run(main())] == [
        (1, "started"),
        (2, "delta"),
        (3, "delta"),
        (4, "cancelled"),
    ]


def test_a_follower_reads_the_log_once_its_subscription_is_live(fresh_prefix: Settings) -> None:
    """The follower that subscribed a job's channel reads the log when the subscription is confirmed, not
    also before it (one read per stream, not two); one that joins a channel already subscribed gets no
    confirmation of its own and reads it at once. Events written before either watched are not lost."""
    r = redis.Redis.from_url(fresh_prefix.redis_url)
    keys = fresh_prefix.keys

    async def main() -> tuple[list[Any], list[Any], int]:
        async with AsyncClient(settings=fresh_prefix) as client:
            job = await client.submit(REQ)  # nobody consumes this prefix: we play the worker
            for seq, type in ((1, "started"), (2, "delta")):  # before anyone watches: in the log only
                fields = {"attempt": 1, "index": 0, "delta": {"content": "2"}} if type == "delta" else {}
                r.xadd(keys.log(job.id), {"e": _event(job.id, seq, type, **fields)}, id=f"{seq}-0")
            reads = 0
            xrange = client.redis.xrange

            async def counted(*args: Any, **kwargs: Any) -> Any:
                nonlocal reads
                reads += 1
                return await xrange(*args, **kwargs)

            client.redis.xrange = counted  # type: ignore[method-assign]

            async def follow() -> list[Any]:
                return [e async for e in client.job(job.id).events(poll_s=30)]  # no quiet poll to the rescue

            first = asyncio.create_task(follow())
            while reads == 0:  # its subscription confirmed, the log read
                await asyncio.sleep(0.01)
            second = asyncio.create_task(follow())
            while reads == 1:
                await asyncio.sleep(0.01)
            final = _event(job.id, 3, "completed")
            r.xadd(keys.log(job.id), {"e": final}, id="3-0")
            r.publish(keys.events(job.id), final)
            return await asyncio.wait_for(first, 10), await asyncio.wait_for(second, 10), reads

    first, second, reads = asyncio.run(main())
    assert [(e.seq, e.type) for e in first] == [(1, "started"), (2, "delta"), (3, "completed")]
    assert [(e.seq, e.type) for e in second] == [(1, "started"), (2, "delta"), (3, "completed")]
    assert reads == 2  # one per follower


def test_an_inbox_wait_ends_at_its_own_deadline_whatever_the_waits_before_it() -> None:
    """One timer serves an inbox's waits: a wait times out when its own timeout is up, neither earlier
    (a shorter wait before it left the timer set sooner) nor later (a longer one left it set later)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        inbox = Inbox()
        loop.call_later(0.01, inbox.put, b"a")
        assert await inbox.get(0.05) == b"a"  # its timer stays set for 0.05 s
        loop.call_later(0.15, inbox.put, b"b")
        assert await inbox.get(1.0) == b"b"  # not ended by the first wait's timer at 0.05 s
        start = loop.time()
        assert await inbox.get(0.1) is None  # the timer, set for the 1 s wait, is brought forward
        assert 0.09 <= loop.time() - start < 0.5
        start = loop.time()
        assert await inbox.get(0.3) is None
        assert loop.time() - start >= 0.29
        loop.call_later(0.01, inbox.put, b"c")
        assert await inbox.get(0.2) == b"c"
        inbox.close()  # the watch ends: its timer with it
        assert inbox._timer is None

    asyncio.run(main())


def test_closing_stops_a_reader_that_lost_its_cancel(fresh_prefix: Settings) -> None:
    """On Python 3.11 a cancel that lands while redis-py sends a command can be lost (moonq/cancel.py);
    the shared reader is cancelled on close while it may be resubscribing. Here it loses the first
    cancel: the close cancels it again and returns, instead of waiting on the reader for ever."""

    async def main() -> int:
        client = Redis.from_url(fresh_prefix.redis_url)
        fanout = Fanout(client)
        heard = 0
        real_next = fanout._next

        async def deaf_next(pubsub: Any) -> Any:
            nonlocal heard
            try:
                return await real_next(pubsub)
            except asyncio.CancelledError:
                heard += 1
                if heard == 1:
                    return None  # as if the cancel had landed in redis-py's wait_for: lost
                raise

        fanout._next = deaf_next  # type: ignore[method-assign]
        async with fanout.watch(f"{fresh_prefix.prefix}:fanout-close") as inbox:
            assert await inbox.get(5) is RESYNC  # subscribed, the reader reading
        closing = asyncio.create_task(fanout.close())
        await asyncio.wait({closing}, timeout=3)  # not wait_for: its own cancel would end the reader
        assert closing.done(), "close() still waits on its reader"
        await client.aclose()
        return heard

    assert asyncio.run(main()) == 2
