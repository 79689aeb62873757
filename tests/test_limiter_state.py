"""The limiter's state: its key names, the window formula, and the formula's Lua twin on a real Redis."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from moonq.tenants import cached_tenants
from tests.helpers import make_settings
from worker.exporter import RedisCollector
from worker.limiter_state import (
    IDLE_GRACE_MS,
    SUM_FIELD,
    WAIT_SCAN,
    LimiterKeys,
    WindowKeys,
    limiter_lua,
    window_used,
)
from worker.ratelimit import Limiter, Limits, shares
from worker.ratelimit_scripts import ACQUIRE_LUA, COOLDOWN_LUA, LEAVE_LUA, RELEASE_LUA, RENEW_LUA

# window_check on its own, at a `now` of the caller's choosing: KEYS grants, units; ARGV now, window
# ms, limit, need. Returns {used, wait ms}.
CHECK_LUA = limiter_lua("""
$window_functions
local used, wait = window_check(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4]))
return {used, wait}
""")


def test_the_key_names_are_the_documented_ones() -> None:
    keys = LimiterKeys.for_prefix("p")
    assert keys == LimiterKeys(
        root="p:{limit}",
        inflight="p:{limit}:inflight",
        cooldown="p:{limit}:cooldown",
        waiters="p:{limit}:waiters",
        alive="p:{limit}:alive",
        wake="p:{limit}:wake",
        vtime="p:{limit}:vtime",
        vclock="p:{limit}:vclock",
        weights="p:{limit}:weights",
        parked="p:{limit}:parked",
    )
    assert keys.scope_inflight("fleet") == "p:{limit}:inflight"  # the names they had before accounts
    assert keys.scope_cooldown("fleet") == "p:{limit}:cooldown"
    assert keys.scope_inflight("account:main") == "p:{limit}:account:main:inflight"
    assert keys.scope_cooldown("account:main") == "p:{limit}:account:main:cooldown"
    assert keys.scope_out("account:main") == "p:{limit}:account:main:out"
    assert keys.rpm == WindowKeys(grants="p:{limit}:fleet:rpm", units="p:{limit}:fleet:rpm:units")
    assert keys.tpm == keys.window("tpm", "fleet") == WindowKeys("p:{limit}:fleet:tpm", "p:{limit}:fleet:tpm:units")
    assert keys.window("tpm", "tenant:acme").grants == "p:{limit}:tenant:acme:tpm"  # issue 13's scopes


@pytest.mark.parametrize(
    ("stored_sum", "expired", "used"),
    [
        (None, [], 0),  # no window stored: empty
        (b"700", [], 700),
        ("700", [b"300", b"100"], 300),  # two grants have left the window, not yet trimmed
        (b"0", [], 0),  # every grant refunded to nothing
        (b"1500", [None], 1500),  # a grant gone from the hash counts nothing
        (42, [42], 0),
    ],
)
def test_window_used(stored_sum: Any, expired: list[Any], used: int) -> None:
    assert window_used(stored_sum, expired) == used


def test_limiter_lua_fills_the_constants_and_leaves_lua_braces_alone() -> None:
    assert limiter_lua("return {'$sum_field', $wait_scan, $idle_grace_ms}") == f"return {{'sum', 256, {IDLE_GRACE_MS}}}"
    assert "local function window_check(zkey, hkey, now, window_ms, limit, need)" in limiter_lua("$window_functions")
    with pytest.raises(KeyError):
        limiter_lua("return $nope")
    for script in (ACQUIRE_LUA, RELEASE_LUA, COOLDOWN_LUA, RENEW_LUA, LEAVE_LUA):
        assert "$" not in script


def expected_wait(
    entries: list[tuple[float, int]], used: int, now: float, window_ms: int, limit: int, need: int
) -> float:
    """What the script's wait should be: until enough of the oldest live grants have left (test reference)."""
    excess, at = used + need - limit, now
    if excess <= 0:
        return 0
    for time_ms, units in sorted(entries)[:WAIT_SCAN]:
        excess, at = excess - units, time_ms
        if excess <= 0:
            break
    return at + window_ms - now


def run(redis_url: str, body: Callable[[Redis], Coroutine[Any, Any, Any]]) -> Any:
    async def main() -> Any:
        redis = Redis.from_url(redis_url)
        try:
            return await body(redis)
        finally:
            await redis.aclose()

    return asyncio.run(main())


async def _window(redis: Redis, window: WindowKeys) -> tuple[Any, dict[str, tuple[float, int]]]:
    """(stored sum, {lease id: (grant ms, units)}) of one window."""
    grants: list[Any] = await redis.zrange(window.grants, 0, -1, withscores=True)
    units: list[Any] = await redis.hmget(window.units, [g for g, _ in grants]) if grants else []
    entries = {g.decode(): (at, int(u)) for (g, at), u in zip(grants, units, strict=True)}
    return await redis.hget(window.units, SUM_FIELD), entries


def test_the_python_formula_matches_the_scripts_on_real_redis(redis_url: str) -> None:
    """Grants and refunds made by the real scripts, then ``window_check`` run on copies of the window at
    chosen times: the units it finds must be ``window_used`` of the same state, and its wait the time
    until enough of the oldest grants have left."""
    window_ms, limit = 1_000, 10_000

    async def body(redis: Redis) -> None:
        prefix = f"ls{uuid.uuid4().hex[:8]}"
        lim = Limiter(redis, prefix, Limits(tpm=limit, window_ms=window_ms))
        lim.start()
        try:
            for cost in (1_500, 300, 200, 2_000, 700):
                lease = await lim.acquire(cost, priority=5, enqueued_at_s=time.time())
                await lim.release(lease, used_tokens=cost // 3 if cost != 300 else 450)  # one used more
                await asyncio.sleep(0.05)  # grants at distinct times
        finally:
            await lim.stop()
        stored_sum, entries = await _window(redis, lim.keys.tpm)
        assert int(stored_sum) == sum(u for _, u in entries.values()) == 500 + 450 + 66 + 666 + 233
        times = sorted(at for at, _ in entries.values())
        for now in (
            times[-1],
            times[0] + window_ms,
            times[2] + window_ms - 1,
            times[2] + window_ms,
            times[-1] + window_ms,
        ):
            for need in (1, 8_500, limit):
                await check(redis, lim.keys.tpm, stored_sum, entries, now, need)

    async def check(
        redis: Redis, window: WindowKeys, stored_sum: Any, entries: dict[str, tuple[float, int]], now: float, need: int
    ) -> None:
        copy = WindowKeys(f"{window.grants}:copy", f"{window.units}:copy")
        for src, dst in ((window.grants, copy.grants), (window.units, copy.units)):
            await redis.copy(src, dst, replace=True)
        used, wait = await redis.eval(CHECK_LUA, 2, copy.grants, copy.units, int(now), window_ms, limit, need)
        expired = [u for at, u in entries.values() if at <= now - window_ms]
        live = [(at, u) for at, u in entries.values() if at > now - window_ms]
        assert used == window_used(stored_sum, expired), (now, need)
        assert wait == expected_wait(live, used, now, window_ms, limit, need), (now, need, live)
        assert await redis.zcard(copy.grants) == len(live)  # trimmed as it went
        await redis.delete(copy.grants, copy.units)

    run(redis_url, body)


def test_a_window_keeps_one_window_of_grants_and_expires_when_idle(redis_url: str) -> None:
    # 2,000,000 TPM in 200 small grants: the window holds only the grants of the last window, and nothing
    # is left once the fleet has been idle for a window.
    window_ms = 1_000

    async def body(redis: Redis) -> tuple[int, int, int, int, int]:
        lim = Limiter(redis, f"ls{uuid.uuid4().hex[:8]}", Limits(tpm=2_000_000, window_ms=window_ms))
        lim.start()
        try:
            for _ in range(200):
                await lim.acquire(10, priority=5, enqueued_at_s=time.time())
            full = await redis.zcard(lim.keys.tpm.grants)
            await asyncio.sleep(window_ms / 1000 + 0.05)
            await lim.acquire(10, priority=5, enqueued_at_s=time.time())  # trims the 200 first
            after = await redis.zcard(lim.keys.tpm.grants), await redis.hlen(lim.keys.tpm.units)
            ttl = await redis.pttl(lim.keys.tpm.units)
            await asyncio.sleep((window_ms + IDLE_GRACE_MS) / 1000 + 0.1)
            return full, *after, ttl, await redis.exists(lim.keys.tpm.grants, lim.keys.tpm.units)
        finally:
            await lim.stop()

    full, grants, fields, ttl, left = run(redis_url, body)
    assert full == 200
    assert (grants, fields) == (1, 2)  # one grant; its units and the sum
    assert 0 < ttl <= window_ms + IDLE_GRACE_MS
    assert left == 0


def _used_at(stored_sum: Any, entries: dict[str, tuple[float, int]], cutoff_ms: float) -> int:
    """``window_used`` with the grants at or before ``cutoff_ms`` left out, as a reader at that time sees it."""
    return window_used(stored_sum, [units for at, units in entries.values() if at <= cutoff_ms])


def _redis_ms(sec_usec: tuple[int, int]) -> float:
    return sec_usec[0] * 1000 + sec_usec[1] / 1000


# window_add on its own, for a grant made `age` ms before Redis' now: KEYS grants, units; ARGV age, window
# ms, lease id, units.
ADD_LUA = limiter_lua("""
$window_functions
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
window_add(KEYS[1], KEYS[2], now - tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]))
return 1
""")


def test_the_exporter_reads_the_windows_through_the_formula(redis_url: str) -> None:
    """``moonq_ratelimit_available`` is the limit less ``window_used`` at a Redis time between two TIMEs
    taken around the scrape, leaving out a grant that has left the window but was not trimmed yet."""
    prefix = f"ls{uuid.uuid4().hex[:8]}"
    settings = make_settings(redis_url, prefix=prefix, rpm=600, tpm=60_000)
    keys = LimiterKeys.for_prefix(prefix)
    window_ms = settings.limits.window_ms

    async def body(redis: Redis) -> dict[str, float]:
        lim = Limiter(redis, prefix, settings.limits)
        lim.start()
        try:
            for cost in (1_500, 300, 200):
                lease = await lim.acquire(cost, priority=5, enqueued_at_s=time.time())
                await lim.release(lease, cost // 3)
        finally:
            await lim.stop()
        for axis in ("rpm", "tpm"):  # granted 70 s ago, and no acquire since has trimmed it
            window = keys.window(axis)
            await redis.eval(ADD_LUA, 2, window.grants, window.units, 70_000, window_ms, "stale", 5_000)
        collector = RedisCollector(settings)
        try:
            t0 = _redis_ms(await redis.time())
            families = {f.name: f for f in collector.collect()}
            t1 = _redis_ms(await redis.time())
        finally:
            collector.redis.close()
        exported = {s.labels["limit"]: s.value for s in families["moonq_ratelimit_available"].samples}
        for axis, limit in settings.limits.rates:
            stored_sum, entries = await _window(redis, keys.window(axis))

            low, high = (limit - _used_at(stored_sum, entries, now - window_ms) for now in (t0, t1))
            assert low <= exported[axis] <= high, (axis, t0, t1, exported[axis])
        return exported

    exported = run(redis_url, body)
    assert exported == {"rpm": 600 - 3, "tpm": 60_000 - 500 - 100 - 66}


def test_the_exporter_shows_each_account_the_cap_and_each_tenant_with_limits(redis_url: str, tmp_path: Path) -> None:
    """With an accounts file: one series set per account (its windows, in-flight leases, cool-down and time
    out of rotation), the cap over all of them as ``account="all"``, and each tenant's own limits, from the
    state real grants left in Redis."""
    accounts = {"main": {"rpm": 500, "max_inflight": 10}, "spare": {"rpm": 200, "max_inflight": 10}}
    files = {
        "accounts.json": {"accounts": {name: {"api_key": f"sk-{name}", **caps} for name, caps in accounts.items()}},
        "tenants.json": {"tenants": {"capped": {"tokens_sha256": [], "rpm": 50, "max_inflight": 5}}},
    }
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    prefix = f"ls{uuid.uuid4().hex[:8]}"
    settings = make_settings(
        redis_url,
        prefix=prefix,
        rpm=600,
        accounts_file=str(tmp_path / "accounts.json"),
        tenants_file=str(tmp_path / "tenants.json"),
    )

    async def body(redis: Redis) -> tuple[Counter[str], Counter[str], dict[str, dict[tuple[str, ...], float]]]:
        """Three grants of ``capped`` held, two of the default tenant given back; then a 429 and a refused key."""
        lim = Limiter(
            redis,
            prefix,
            settings.limits,
            accounts={name: Limits(caps["rpm"], None, caps["max_inflight"]) for name, caps in accounts.items()},
            tenants=shares(cached_tenants(settings.tenants_file)),
        )
        lim.start()
        try:
            held = [await lim.acquire(1, priority=5, enqueued_at_s=time.time(), tenant="capped") for _ in range(3)]
            released = [await lim.acquire(1, priority=5, enqueued_at_s=time.time()) for _ in range(2)]
            for lease in released:
                await lim.release(lease, None)
            await lim.cooldown(3.0, "main")
            await lim.take_out("spare", 250.0)
        finally:
            await lim.stop()
        collector = RedisCollector(settings)
        try:
            families = {f.name: {tuple(s.labels.values()): s.value for s in f.samples} for f in collector.collect()}
        finally:
            collector.redis.close()
        return Counter(lease.account for lease in held), Counter(lease.account for lease in held + released), families

    in_flight, granted, families = run(redis_url, body)
    assert families["moonq_ratelimit_limit"] == {
        ("main", "rpm"): 500,
        ("main", "inflight"): 10,
        ("spare", "rpm"): 200,
        ("spare", "inflight"): 10,
        ("all", "rpm"): 600,
    }
    available = families["moonq_ratelimit_available"]
    # Five grants in all, each in its account's window and the cap's; the three held are in flight still.
    assert sum(granted.values()) == 5 and set(granted) == {"main", "spare"}, granted  # the most headroom first
    for name, caps in accounts.items():
        assert available[name, "rpm"] == caps["rpm"] - granted[name], name
        assert available[name, "inflight"] == caps["max_inflight"] - in_flight[name], name
    assert available["all", "rpm"] == 600 - 5
    assert families["moonq_tenant_limit"] == {("capped", "rpm"): 50, ("capped", "inflight"): 5}
    assert families["moonq_tenant_available"] == {("capped", "rpm"): 50 - 3, ("capped", "inflight"): 5 - 3}
    cooldown, out = families["moonq_ratelimit_cooldown_seconds"], families["moonq_account_out_of_rotation_seconds"]
    assert 2.0 < cooldown["main",] <= 3.0 and cooldown["spare",] == 0
    assert out["main",] == 0 and 249.0 < out["spare",] <= 250.0
