"""The fleet limiter against a real Redis, several Limiter instances standing in for several processes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from worker.limiter_state import LimiterKeys
from worker.ratelimit import Lease, Limiter, Limits


def run(redis_url: str, body: Callable[[Callable[..., Limiter]], Awaitable[Any]]) -> Any:
    """Run ``body`` with a factory of started limiters sharing one fresh prefix; stop them all after."""

    async def main() -> Any:
        redis = Redis.from_url(redis_url)
        prefix = f"rl{uuid.uuid4().hex[:8]}"
        made: list[Limiter] = []

        def limiter(limits: Limits, **kw: Any) -> Limiter:
            lim = Limiter(redis, prefix, limits, **kw)
            lim.start()
            made.append(lim)
            return lim

        listener = asyncio.create_task(_wake_all(redis, LimiterKeys.for_prefix(prefix).wake, made))
        try:
            return await asyncio.wait_for(body(limiter), timeout=30)
        finally:
            listener.cancel()
            for lim in made:
                await lim.stop()
            await redis.aclose()

    return asyncio.run(main())


async def _wake_all(redis: Redis, channel: str, limiters: list[Limiter]) -> None:
    # What the runtime's listener does for its process's limiter.
    async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(channel)
        async for _ in pubsub.listen():
            for lim in limiters:
                lim.wake()


async def hold(lim: Limiter, seconds: float, log: list[tuple[str, float]], name: str, **kw: Any) -> None:
    lease = await lim.acquire(
        kw.pop("cost", 1), priority=kw.pop("priority", 5), enqueued_at_s=kw.pop("at", time.time())
    )
    log.append((name, time.monotonic()))
    await asyncio.sleep(seconds)
    await lim.release(lease, used_tokens=None)


def test_in_flight_cap_holds_across_processes(redis_url: str) -> None:
    async def body(limiter: Callable[..., Limiter]) -> int:
        limits = Limits(max_inflight=3)
        procs = [limiter(limits) for _ in range(4)]
        now, peak = 0, 0

        async def one(lim: Limiter) -> None:
            nonlocal now, peak
            lease = await lim.acquire(1, priority=5, enqueued_at_s=time.time())
            now += 1
            peak = max(peak, now)
            await asyncio.sleep(0.02)
            now -= 1
            await lim.release(lease, used_tokens=None)

        await asyncio.gather(*(one(procs[i % 4]) for i in range(40)))
        return peak

    assert run(redis_url, body) == 3


def test_rpm_bucket_never_exceeds_its_ceiling(redis_url: str) -> None:
    # 600/min with a burst of 10: at most 10 at once, then 590/62 per second. The ceiling is a hard
    # bound (grants <= burst + rate * elapsed), so this cannot flake on a slow machine.
    async def body(limiter: Callable[..., Limiter]) -> tuple[int, float]:
        limits = Limits(rpm=600, rpm_burst=10)
        procs = [limiter(limits) for _ in range(4)]
        start = time.monotonic()
        grants: list[float] = []

        async def one(lim: Limiter) -> None:
            await lim.acquire(1, priority=5, enqueued_at_s=time.time())
            grants.append(time.monotonic() - start)

        await asyncio.gather(*(one(procs[i % 4]) for i in range(25)))
        return len(grants), max(grants)

    count, elapsed = run(redis_url, body)
    assert count == 25
    assert count <= 10 + (590 / 62) * elapsed + 1  # the bucket's bound
    assert elapsed >= (25 - 10 - 1) / (590 / 62) * 0.9  # and it did make the later ones wait


def test_tpm_reserves_and_refunds(redis_url: str) -> None:
    async def body(limiter: Callable[..., Limiter]) -> tuple[float, float]:
        lim = limiter(Limits(tpm=60_000, tpm_burst=1_000))  # refill 59,000/62 ≈ 952 tokens/s
        lease = await lim.acquire(1_000, priority=5, enqueued_at_s=time.time())  # empties the bucket
        await lim.release(lease, used_tokens=100)  # 900 come back
        t0 = time.monotonic()
        await lim.acquire(900, priority=5, enqueued_at_s=time.time())
        refunded_wait = time.monotonic() - t0
        t1 = time.monotonic()
        await lim.acquire(500, priority=5, enqueued_at_s=time.time())  # nothing left: ~0.5 s of refill
        empty_wait = time.monotonic() - t1
        return refunded_wait, empty_wait

    refunded_wait, empty_wait = run(redis_url, body)
    assert refunded_wait < empty_wait
    assert empty_wait >= 0.4


def test_a_reservation_is_capped_at_one_minute_of_tokens(redis_url: str) -> None:
    async def body(limiter: Callable[..., Limiter]) -> int:
        lim = limiter(Limits(tpm=60_000, tpm_burst=60_000 - 1))
        lease = await lim.acquire(10**12, priority=5, enqueued_at_s=time.time())  # max_completion_tokens: 1e12
        await lim.release(lease, used_tokens=0)  # the upstream refused it: everything comes back
        return lease.reserved_tokens

    assert run(redis_url, body) == 60_000


def test_waiters_are_served_in_priority_then_arrival_order(redis_url: str) -> None:
    async def body(limiter: Callable[..., Limiter]) -> list[str]:
        a, b = limiter(Limits(max_inflight=1)), limiter(Limits(max_inflight=1))
        first = await a.acquire(1, priority=5, enqueued_at_s=time.time())
        order: list[tuple[str, float]] = []
        t = time.time()
        waiters = [
            hold(a, 0.01, order, "a-p9", priority=9, at=t),
            hold(b, 0.01, order, "b-p1-late", priority=1, at=t + 2),
            hold(a, 0.01, order, "a-p5", priority=5, at=t),
            hold(b, 0.01, order, "b-p1", priority=1, at=t + 1),
        ]
        tasks = [asyncio.create_task(w) for w in waiters]
        await asyncio.sleep(0.3)  # everyone queued behind the held slot
        await a.release(first, used_tokens=None)
        await asyncio.gather(*tasks)
        return [name for name, _ in order]

    assert run(redis_url, body) == ["b-p1", "b-p1-late", "a-p5", "a-p9"]


def test_a_dead_holders_slot_comes_back_after_the_lease_ttl(redis_url: str) -> None:
    async def body(limiter: Callable[..., Limiter]) -> float:
        dead = limiter(Limits(max_inflight=1), lease_ttl_s=0.6)
        alive = limiter(Limits(max_inflight=1), lease_ttl_s=0.6)
        await dead.acquire(1, priority=5, enqueued_at_s=time.time())
        await dead.stop()  # no release and no more renewals: as if the process was killed
        t0 = time.monotonic()
        await alive.acquire(1, priority=5, enqueued_at_s=time.time())
        return time.monotonic() - t0

    waited = run(redis_url, body)
    assert 0.3 <= waited < 3.0


def test_a_live_holder_keeps_its_slot_past_the_ttl(redis_url: str) -> None:
    async def body(limiter: Callable[..., Limiter]) -> bool:
        holder = limiter(Limits(max_inflight=1), lease_ttl_s=0.3)
        other = limiter(Limits(max_inflight=1), lease_ttl_s=0.3)
        lease: Lease = await holder.acquire(1, priority=5, enqueued_at_s=time.time())
        waiting = asyncio.create_task(other.acquire(1, priority=5, enqueued_at_s=time.time()))
        await asyncio.sleep(1.0)  # three TTLs: renewals keep it
        still_waiting = not waiting.done()
        await holder.release(lease, used_tokens=None)
        await asyncio.wait_for(waiting, 2)
        return still_waiting

    assert run(redis_url, body)


def test_cooldown_holds_every_process_back(redis_url: str) -> None:
    async def body(limiter: Callable[..., Limiter]) -> float:
        a, b = limiter(Limits()), limiter(Limits())
        await a.cooldown(0.5)
        t0 = time.monotonic()
        await b.acquire(1, priority=5, enqueued_at_s=time.time())
        return time.monotonic() - t0

    assert run(redis_url, body) >= 0.4


def test_cancelled_waiter_leaves_no_trace(redis_url: str) -> None:
    async def body(limiter: Callable[..., Limiter]) -> bool:
        lim = limiter(Limits(max_inflight=1))
        lease = await lim.acquire(1, priority=5, enqueued_at_s=time.time())
        waiter = asyncio.create_task(lim.acquire(1, priority=0, enqueued_at_s=time.time()))
        await asyncio.sleep(0.1)
        waiter.cancel()
        await lim.release(lease, used_tokens=None)
        nxt = await asyncio.wait_for(lim.acquire(1, priority=5, enqueued_at_s=time.time()), 2)
        return isinstance(nxt, Lease)

    assert run(redis_url, body)


@pytest.mark.parametrize(
    ("limits", "message"),
    [(dict(rpm=10, rpm_burst=10), "rpm_burst must be"), (dict(tpm=100, tpm_burst=0), "tpm_burst must be")],
)
def test_burst_must_leave_room_to_refill(limits: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limits(**limits)
