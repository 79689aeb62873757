"""The limiter's state: its key names, the bucket formula, and the formula's Lua twin on a real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.helpers import make_settings
from worker.exporter import RedisCollector
from worker.limiter_state import BUCKET_FIELDS, REFILL_PERIOD_MS, LimiterKeys, bucket_level, limiter_lua
from worker.ratelimit import Limiter
from worker.ratelimit_scripts import ACQUIRE_LUA, COOLDOWN_LUA, LEAVE_LUA, RELEASE_LUA, RENEW_LUA

TOLERANCE = 1e-6  # Lua's numbers reach Redis as decimal strings; allow for their last digit


def test_the_key_names_are_the_documented_ones() -> None:
    keys = LimiterKeys.for_prefix("p")
    assert keys == LimiterKeys(
        rpm="p:limit:rpm",
        tpm="p:limit:tpm",
        inflight="p:limit:inflight",
        cooldown="p:limit:cooldown",
        waiters="p:limit:waiters",
        alive="p:limit:alive",
        wake="p:limit:wake",
    )


# (stored tokens, stored ts ms, now ms, limit, burst) -> level; refill is (limit - burst) per 62 s.
@pytest.mark.parametrize(
    ("tokens", "ts_ms", "now_ms", "limit", "burst", "level"),
    [
        (None, None, 5_000, 600, 10, 10.0),  # no bucket stored: full
        (3, 1_000, 1_000, 600, 10, 3.0),  # no time passed
        (0, 0, 31_000, 130, 10, 10.0),  # 120 per 62 s: 60 in 31 s, capped at the burst
        (0, 0, 31_000, 1_010, 1_000, 5.0),  # 10 per 62 s: 5 in 31 s
        (-500, 10_000, 10_000, 60_000, 1_000, -500.0),  # a debt stays until refilled
        (-500, 0, 3_100, 21_000, 1_000, 500.0),  # 20,000 per 62 s: 1,000 in 3.1 s
        (0, 0, 31_000, 1, 1, 0.5),  # a limit no larger than its burst still refills, 1 per period
        (b"2.5", b"1000", 1_000 + 62_000 / 590, 600, 10, 3.5),  # HMGET's bytes; 590 per 62 s
        ("7", "0", 0, 600, 10, 7.0),
    ],
)
def test_bucket_level(tokens: Any, ts_ms: Any, now_ms: float, limit: int, burst: int, level: float) -> None:
    assert bucket_level([tokens, ts_ms], now_ms, limit, burst) == pytest.approx(level)


def test_the_refill_period_is_62_s() -> None:
    assert REFILL_PERIOD_MS == 62_000
    assert bucket_level([0, 0], REFILL_PERIOD_MS, 70, 10) == pytest.approx(10.0)  # 60 per period, capped at 10
    assert bucket_level([-50, 0], REFILL_PERIOD_MS, 70, 10) == pytest.approx(10.0)
    assert bucket_level([-50, 0], REFILL_PERIOD_MS / 2, 70, 10) == pytest.approx(-20.0)


def test_a_bucket_with_tokens_but_no_ts_is_refused() -> None:
    with pytest.raises(ValueError, match="no ts"):
        bucket_level([b"1", None], 0, 10, 1)


def test_limiter_lua_fills_the_constants_and_leaves_lua_braces_alone() -> None:
    assert limiter_lua("return {$refill_period_ms, $bucket_ttl_ms}") == "return {62000, 120000}"
    assert "local function bucket_level(key, limit, burst, now)" in limiter_lua("$bucket_level")
    with pytest.raises(KeyError):
        limiter_lua("return $nope")
    for script in (ACQUIRE_LUA, RELEASE_LUA, COOLDOWN_LUA, RENEW_LUA, LEAVE_LUA):
        assert "$" not in script


async def _stored(redis: Redis, key: str) -> list[Any]:
    return list(await redis.hmget(key, *BUCKET_FIELDS))


def _redis_ms(sec_usec: tuple[int, int]) -> float:
    return sec_usec[0] * 1000 + sec_usec[1] / 1000


def test_the_python_formula_matches_the_scripts_on_real_redis(redis_url: str) -> None:
    """Each grant stores ``level(at its now) - cost`` and each refund ``min(burst, level + refund)``, with
    ``now`` the ts it stores; the Python formula, given the state before, must land on the state after.
    Then the exporter's ``moonq_ratelimit_available`` must lie between the formula at Redis TIMEs taken
    just before and just after its scrape."""
    prefix = f"ls{uuid.uuid4().hex[:8]}"
    settings = make_settings(redis_url, prefix=prefix, rpm=600, tpm=60_000, tpm_burst=1_000)
    limits = settings.limits
    keys = LimiterKeys.for_prefix(prefix)
    buckets = {"rpm": (keys.rpm, limits.rpm or 0, limits.rpm_bucket), "tpm": (keys.tpm, limits.tpm or 0, 1_000)}

    async def check_step(redis: Redis, step: Callable[[], Awaitable[Any]], cost: dict[str, float]) -> Any:
        before = {axis: await _stored(redis, key) for axis, (key, _, _) in buckets.items()}
        result = await step()
        for axis, (key, limit, burst) in buckets.items():
            tokens, ts = await _stored(redis, key)
            expected = bucket_level(before[axis], float(ts), limit, burst) + cost[axis]
            if cost[axis] > 0:  # a refund: never above the burst
                expected = min(float(burst), expected)
            assert float(tokens) == pytest.approx(expected, abs=TOLERANCE), (axis, before[axis], tokens, ts)
        return result

    async def main() -> None:
        redis = Redis.from_url(redis_url)
        lim = Limiter(redis, prefix, limits)
        lim.start()
        try:
            for cost in (1_500, 300, 200):  # 1,500 from a full bucket of 1,000: granted, into debt
                grant = partial(lim.acquire, cost, priority=5, enqueued_at_s=time.time())
                lease = await check_step(redis, grant, {"rpm": -1, "tpm": -cost})
                await asyncio.sleep(0.05)  # let some refill show in the next step
                used = cost // 3
                await check_step(redis, partial(lim.release, lease, used), {"rpm": 0, "tpm": cost - used})
            await scrape_between_two_times(redis)
        finally:
            await lim.stop()
            await redis.aclose()

    async def scrape_between_two_times(redis: Redis) -> None:
        collector = RedisCollector(settings)
        try:
            t0 = _redis_ms(await redis.time())
            families = {f.name: f for f in collector.collect()}
            t1 = _redis_ms(await redis.time())
        finally:
            collector.redis.close()
        exported = {s.labels["limit"]: s.value for s in families["moonq_ratelimit_available"].samples}
        for axis, (key, limit, burst) in buckets.items():
            stored = await _stored(redis, key)
            low, high = bucket_level(stored, t0, limit, burst), bucket_level(stored, t1, limit, burst)
            assert low - TOLERANCE <= exported[axis] <= high + TOLERANCE, (axis, low, exported[axis], high)
        assert exported["tpm"] < 1_000  # still refilling: the comparison is not just burst == burst

    asyncio.run(main())
