"""The fleet limiter against a real Redis, several Limiter instances standing in for several processes.

The rate tests shorten the window (``Limits.window_ms``) to 1.5-2 s; grant times are read from the
windows themselves (Redis TIME, as the script stored them), not from the test's clock.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from harness import WorkerProcess
from moonq.record import DEFAULT_TENANT
from moonq.settings import ClientSettings
from producers import Client, JobFailed
from simulator import SimConfig, SimServer, max_in_window
from tests.helpers import make_settings, node_env, wait_until
from tests.helpers import run_limiters as run
from worker import settings as worker_settings
from worker.errors import CapacityWaitTimeout
from worker.limiter_state import MAX_WINDOW_MS, SUM_FIELD, LimiterKeys, window_used
from worker.ratelimit import Lease, Limiter, Limits

REQUEST = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Is there room?"}]}


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


class Grants:
    """Every grant entered in the windows of ``keys``: lease id -> (Redis ms, units at grant), per axis.

    Polled every 20 ms while the test runs; a grant stays in its window for a whole window (well over
    the poll period), so none is missed.
    """

    def __init__(self, redis: Redis, keys: LimiterKeys) -> None:
        self.redis, self.keys = redis, keys
        self.seen: dict[str, dict[str, tuple[float, int]]] = {"rpm": {}, "tpm": {}}

    async def poll(self) -> None:
        while True:
            await self.snapshot()
            await asyncio.sleep(0.02)

    async def snapshot(self) -> None:
        for axis, seen in self.seen.items():
            window = self.keys.window(axis)
            grants: list[Any] = await self.redis.zrange(window.grants, 0, -1, withscores=True)
            for raw, at in grants:
                lease_id = raw.decode()
                if lease_id not in seen:
                    units = await self.redis.hget(window.units, lease_id)
                    seen.setdefault(lease_id, (at, int(units or 0)))  # the first read, before any refund

    def times(self, axis: str) -> list[float]:
        return sorted(at for at, _ in self.seen[axis].values())


async def evalsha_calls(redis: Redis) -> int:
    return int((await redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0))


def test_after_an_idle_window_the_whole_limit_goes_at_once(redis_url: str) -> None:
    # L = 5 per 2 s window: five calls at once, and the sixth exactly when the first leaves the window,
    # having slept for it rather than asked again and again.
    async def body(limiter: Callable[..., Limiter]) -> tuple[list[float], int]:
        limits = Limits(rpm=5, window_ms=2_000)
        procs = [limiter(limits) for _ in range(3)]
        grants = Grants(procs[0]._redis, procs[0].keys)
        poller = asyncio.create_task(grants.poll())
        calls_before = await evalsha_calls(procs[0]._redis)
        await asyncio.gather(*(p.acquire(1, priority=5, enqueued_at_s=time.time()) for p in procs * 2))
        calls = await evalsha_calls(procs[0]._redis) - calls_before
        await grants.snapshot()
        poller.cancel()
        return grants.times("rpm"), calls

    times, calls = run(redis_url, body)
    assert len(times) == 6
    assert times[4] - times[0] < 500  # the first five at once
    assert 2_000 <= times[5] - times[0] < 2_300  # the sixth when the first has left, not before, not much after
    assert calls < 20  # 6 grants and the waits they named (plus wake-ups), no polling through 2 s


def test_a_burst_of_waiters_is_granted_in_a_few_calls_in_order(redis_url: str) -> None:
    # 200 job starts at once in one process, 150 of them fit the minute: one script call grants up to
    # ASK_BATCH of them, in (priority, arrival) order, each checked as if it had asked alone; the 151st
    # learns how long to wait. Asked one by one they waited for 150 round trips in a row.
    async def body(limiter: Callable[..., Limiter]) -> tuple[list[int], int, list[Lease]]:
        lim = limiter(Limits(rpm=150, tpm=150 * 40))
        t = time.time()
        order: list[int] = []

        async def one(i: int) -> Lease:
            lease = await lim.acquire(40, priority=i % 3, enqueued_at_s=t + i / 1000)
            order.append(i)
            return lease

        calls_before = await evalsha_calls(lim._redis)
        tasks = [asyncio.create_task(one(i)) for i in range(200)]
        await asyncio.sleep(1.0)
        calls = await evalsha_calls(lim._redis) - calls_before
        granted = [task.result() for task in tasks if task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return order, calls, granted

    order, calls, granted = run(redis_url, body)
    assert len(order) == 150
    assert order == sorted(order, key=lambda i: (i % 3, i))  # priority, then arrival
    assert calls <= 10  # three batches (64, 64, 22) and the refusal's ask, plus wake-ups
    assert {lease.limit for lease in granted} == {"none"}
    assert len({lease.id for lease in granted}) == 150


def test_never_more_than_the_limit_in_any_window(redis_url: str) -> None:
    # Random costs (some above the whole TPM), random holds and random usage over three processes; in no
    # window of W may the grants (their units after refunds, which only lower them) exceed either limit.
    window_ms, rpm, tpm = 1_500, 12, 1_000
    rng = random.Random(13)
    jobs = [(rng.randint(1, 300) if i % 10 else 1_500, rng.uniform(0, 0.3), rng.random()) for i in range(30)]

    async def body(limiter: Callable[..., Limiter]) -> tuple[Grants, dict[str, int]]:
        limits = Limits(rpm=rpm, tpm=tpm, window_ms=window_ms)
        procs = [limiter(limits) for _ in range(3)]
        grants = Grants(procs[0]._redis, procs[0].keys)
        poller = asyncio.create_task(grants.poll())
        used: dict[str, int] = {}

        async def one(i: int, cost: int, hold_s: float, share: float) -> None:
            lease = await procs[i % 3].acquire(cost, priority=rng.randint(0, 9), enqueued_at_s=time.time())
            await grants.snapshot()  # before the refund: the units the grant took
            await asyncio.sleep(hold_s)
            used[lease.id] = int(lease.reserved_tokens * share)
            await procs[i % 3].release(lease, used_tokens=used[lease.id])

        await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))
        poller.cancel()
        return grants, used

    grants, used = run(redis_url, body)
    assert len(grants.seen["rpm"]) == len(grants.seen["tpm"]) == len(jobs)
    assert max_in_window([(at / 1000, 1) for at in grants.times("rpm")], window_ms / 1000) <= rpm
    at_grant = [(at / 1000, units) for at, units in grants.seen["tpm"].values()]
    assert max(units for _, units in at_grant) == tpm  # the oversize calls reserved the whole window
    settled = [(at / 1000, used[lease_id]) for lease_id, (at, _) in grants.seen["tpm"].items()]
    assert max_in_window(settled, window_ms / 1000) <= tpm
    # Refunds let more in than the reservations alone would have: the windows were used, not just held.
    assert max_in_window(at_grant, window_ms / 1000) > tpm


def test_a_refund_lowers_its_grant_and_creates_no_credit(redis_url: str) -> None:
    async def body(limiter: Callable[..., Limiter]) -> tuple[float, float, int, int]:
        lim = limiter(Limits(tpm=1_000, window_ms=2_000))
        units = lim.keys.tpm.units
        lease = await lim.acquire(1_000, priority=5, enqueued_at_s=time.time())  # the whole window
        await lim.release(lease, used_tokens=100)  # its grant now holds 100
        t0 = time.monotonic()
        await lim.acquire(900, priority=5, enqueued_at_s=time.time())  # fits at once
        refunded_wait = time.monotonic() - t0
        t1 = time.monotonic()
        late = await lim.acquire(1, priority=5, enqueued_at_s=time.time())  # full: waits for the first to leave
        full_wait = time.monotonic() - t1
        await asyncio.sleep(2.1)  # every grant has left the window
        await lim.release(late, used_tokens=0)  # a refund for a grant the window no longer holds
        # What the window holds now: its stored sum less the grants that have left but are not trimmed
        # yet (the 900 grant is trimmed by the late ask only if that ask woke after it had left too).
        sec, usec = await lim._redis.time()
        gone: list[Any] = await lim._redis.zrangebyscore(lim.keys.tpm.grants, "-inf", sec * 1000 + usec // 1000 - 2_000)
        stored = await lim._redis.hget(units, SUM_FIELD)
        after_late_refund = window_used(stored, await lim._redis.hmget(units, gone) if gone else [])
        fresh = await lim.acquire(400, priority=5, enqueued_at_s=time.time())
        await lim.release(fresh, used_tokens=500)  # usage above the estimate: the grant holds more
        return refunded_wait, full_wait, after_late_refund, int(await lim._redis.hget(units, SUM_FIELD) or 0)

    refunded_wait, full_wait, after_late_refund, after_overuse = run(redis_url, body)
    assert refunded_wait < 0.2
    assert 1.5 <= full_wait < 2.4
    assert after_late_refund == 0  # every grant has left, and no credit (< 0) for the next window
    assert after_overuse == 500


def test_a_reservation_above_the_limit_goes_alone_on_an_empty_window(redis_url: str) -> None:
    # A call reserving more than the whole TPM (max_completion_tokens: 1e12) reserves the whole window:
    # it waits until the window is empty (not forever), holds it while it runs, and its refund frees it.
    async def body(limiter: Callable[..., Limiter]) -> tuple[int, float, bool, float]:
        a, b = limiter(Limits(tpm=1_000, window_ms=1_500)), limiter(Limits(tpm=1_000, window_ms=1_500))
        await a.acquire(300, priority=5, enqueued_at_s=time.time())
        t0 = time.monotonic()
        huge = await a.acquire(10**12, priority=5, enqueued_at_s=time.time())
        huge_wait = time.monotonic() - t0
        small = asyncio.create_task(b.acquire(1, priority=5, enqueued_at_s=time.time()))
        await asyncio.sleep(0.3)
        held_back = not small.done()
        t1 = time.monotonic()
        await a.release(huge, used_tokens=0)  # the upstream refused it: everything comes back
        await asyncio.wait_for(small, 1)
        return huge.reserved_tokens, huge_wait, held_back, time.monotonic() - t1

    reserved, huge_wait, held_back, freed_after = run(redis_url, body)
    assert reserved == 1_000
    assert 1.2 <= huge_wait < 2.0  # until the 300 left the window
    assert held_back
    assert freed_after < 0.3


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


@pytest.mark.parametrize(("aging_s", "expected"), [(60.0, ["old-p9", "new-p0"]), (0.0, ["new-p0", "old-p9"])])
def test_priorities_age_so_old_work_is_not_starved(redis_url: str, aging_s: float, expected: list[str]) -> None:
    """One level is worth aging_s of waiting: a priority-9 job ten minutes old beats a fresh priority 0."""

    async def body(limiter: Callable[..., Limiter]) -> list[str]:
        lim = limiter(Limits(max_inflight=1), priority_aging_s=aging_s)
        first = await lim.acquire(1, priority=5, enqueued_at_s=time.time())
        order: list[tuple[str, float]] = []
        now = time.time()
        tasks = [
            asyncio.create_task(hold(lim, 0.01, order, "new-p0", priority=0, at=now)),
            asyncio.create_task(hold(lim, 0.01, order, "old-p9", priority=9, at=now - 600)),
        ]
        await asyncio.sleep(0.2)
        await lim.release(first, used_tokens=None)
        await asyncio.gather(*tasks)
        return [name for name, _ in order]

    assert run(redis_url, body) == expected


def test_a_wait_for_capacity_has_a_deadline(redis_url: str) -> None:
    """Past max_wait_s the waiter leaves the line with CapacityWaitTimeout; the next one is not held up."""

    async def body(limiter: Callable[..., Limiter]) -> tuple[float, str]:
        lim = limiter(Limits(max_inflight=1), max_wait_s=0.4)
        held = await lim.acquire(1, priority=5, enqueued_at_s=time.time())
        started = time.monotonic()
        with pytest.raises(CapacityWaitTimeout) as timed_out:
            await lim.acquire(1, priority=5, enqueued_at_s=time.time())
        waited = time.monotonic() - started
        await lim.release(held, used_tokens=None)
        again = await lim.acquire(1, priority=5, enqueued_at_s=time.time())  # the line is free again
        await lim.release(again, used_tokens=None)
        return waited, str(timed_out.value)

    waited, message = run(redis_url, body)
    assert 0.35 <= waited < 2.0
    assert "MOONQ_CAPACITY_WAIT_S" in message and "inflight" in message and "no request was sent" in message


def test_a_job_that_found_no_capacity_fails_without_a_call(redis_url: str) -> None:
    """End to end on a real node: capacity_wait_timeout_error, and the upstream saw only the slot's holder."""
    settings = make_settings(redis_url, prefix=f"cw{uuid.uuid4().hex[:6]}")
    with SimServer(SimConfig(seed=3)) as sim:
        env = node_env(settings, sim.base_url, MOONQ_MAX_INFLIGHT="1", MOONQ_CAPACITY_WAIT_S="0.5")
        with WorkerProcess(env), Client(settings=ClientSettings(redis_url=redis_url, prefix=settings.prefix)) as c:
            slow = c.submit({**REQUEST, "sim": {"fault": "stall:3"}})
            wait_until(lambda: slow.status() == "running", 10, "the slow job holding the only slot")
            starved = c.submit(REQUEST)
            with pytest.raises(JobFailed) as failed:
                starved.result(timeout=20)
            assert failed.value.error["type"] == "capacity_wait_timeout_error"
            assert sim.stats()["requests"] == 1


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


def test_the_window_keeps_97_percent_of_the_limit() -> None:
    assert Limits().window_ms == 61_500 and 60_000 / MAX_WINDOW_MS >= 0.97
    for window_ms in (0, MAX_WINDOW_MS):
        with pytest.raises(ValueError, match="window_ms must be"):
            Limits(rpm=10, window_ms=window_ms)


def test_the_old_burst_settings_are_accepted_ignored_and_warned_about_once(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    worker_settings._warn_ignored.cache_clear()  # as in a fresh process
    with caplog.at_level(logging.WARNING, logger="moonq.worker"):
        settings = [make_settings(redis_url, rpm=600, rpm_burst=10, tpm_burst=5) for _ in range(3)]
    assert settings[0].limits == Limits(rpm=600)
    warned = [r.getMessage() for r in caplog.records if "deprecated_setting" in r.getMessage()]
    assert len(warned) == 1 and "MOONQ_RPM_BURST,MOONQ_TPM_BURST" in warned[0]


def test_only_calls_an_ask_held_back_count_as_waiting(redis_url: str) -> None:
    """``waiting()`` orders a node's intake (moonq/broker.py, TenantCycle): a call granted at its first ask
    never counts, also while that ask is in flight; one held back counts until it goes."""

    async def body(limiter: Callable[..., Limiter]) -> bool:
        lim = limiter(Limits(max_inflight=1))
        seen: list[dict[str, int]] = []
        first = asyncio.create_task(lim.acquire(1, priority=5, enqueued_at_s=time.time()))
        while not first.done():  # the ask's round trip: not waiting
            seen.append(lim.waiting())
            await asyncio.sleep(0)
        lease = first.result()
        assert seen and all(not w for w in seen) and not lim.waiting()
        second = asyncio.create_task(lim.acquire(1, priority=5, enqueued_at_s=time.time()))
        await asyncio.sleep(0.2)
        assert lim.waiting() == {DEFAULT_TENANT: 1}  # held back by max_inflight
        await lim.release(lease, used_tokens=None)
        await lim.release(await asyncio.wait_for(second, 5), used_tokens=None)
        return not lim.waiting()

    assert run(redis_url, body)
