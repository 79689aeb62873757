"""Fair share between tenants, tenants' own limits and the accounts pool, in the fleet limiter.

Real Redis; several ``Limiter`` instances stand in for several processes (``run_limiters``). The
fleet holds one call at a time (``max_inflight=1``) and each grant is given back at once, so the
order of grants is the order the limiter chose, with no timing in it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.helpers import run_limiters
from worker.errors import UnknownAccount
from worker.ratelimit import Lease, Limiter, Limits, Share

ONE_AT_A_TIME = Limits(max_inflight=1)


async def take_turns(limiters: dict[str, Limiter], waiting: dict[str, int], grants: int) -> list[str]:
    """Queue ``waiting[t]`` calls of each tenant ``t`` (on ``limiters[t]``) behind a held slot, let go, and
    return the tenants of the first ``grants`` grants, in order."""
    first = next(iter(limiters.values()))
    blocker = await first.acquire(1, priority=5, enqueued_at_s=time.time(), tenant="blocker")
    order: list[str] = []
    done = asyncio.Event()

    async def call(lim: Limiter, tenant: str, at: float) -> None:
        lease = await lim.acquire(1, priority=5, enqueued_at_s=at, tenant=tenant)
        order.append(tenant)
        if len(order) >= grants:
            done.set()
        await lim.release(lease, used_tokens=None)

    tasks = [
        asyncio.create_task(call(limiters[tenant], tenant, time.time() + i * 1e-3))
        for tenant, n in waiting.items()
        for i in range(n)
    ]
    await asyncio.sleep(0.3)  # everyone in line
    await first.release(blocker, used_tokens=None)
    await asyncio.wait_for(done.wait(), 20)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return order[:grants]


@pytest.mark.parametrize("processes", ["one", "one per tenant"])
def test_grants_go_in_proportion_to_weights(redis_url: str, processes: str) -> None:
    shares = {"search": Share(weight=3), "reports": Share(weight=1)}

    async def body(limiter: Callable[..., Limiter]) -> list[str]:
        if processes == "one":
            shared = limiter(ONE_AT_A_TIME, tenants=shares)
            lims = {"search": shared, "reports": shared}
        else:
            lims = {t: limiter(ONE_AT_A_TIME, tenants=shares) for t in shares}
        return await take_turns(lims, {"reports": 30, "search": 30}, 40)

    order = run_limiters(redis_url, body)
    # Start-time fair queueing: every window of 4 grants holds 3 of search's and 1 of reports'.
    for start in range(0, 40, 4):
        assert Counter(order[start : start + 4]) == {"search": 3, "reports": 1}, order


def test_three_tenants_1_1_2(redis_url: str) -> None:
    shares = {"a": Share(weight=1), "b": Share(weight=1), "c": Share(weight=2)}

    async def body(limiter: Callable[..., Limiter]) -> list[str]:
        lims = {t: limiter(ONE_AT_A_TIME, tenants=shares) for t in shares}
        return await take_turns(lims, {"a": 30, "b": 30, "c": 40}, 60)

    assert Counter(run_limiters(redis_url, body)) == {"a": 15, "b": 15, "c": 30}


def test_an_idle_tenant_banks_no_credit_and_a_lone_one_takes_everything(redis_url: str) -> None:
    shares = {"early": Share(weight=1), "late": Share(weight=1)}

    async def body(limiter: Callable[..., Limiter]) -> list[str]:
        lim = limiter(ONE_AT_A_TIME, tenants=shares)
        alone = await take_turns({"early": lim}, {"early": 25}, 20)  # work-conserving: all of it
        assert alone == ["early"] * 20
        # late was idle all along: it rejoins at the fleet's clock, so it does not get 20 grants in a row.
        return await take_turns({"early": lim, "late": lim}, {"early": 20, "late": 20}, 20)

    order = run_limiters(redis_url, body)
    assert Counter(order) == {"early": 10, "late": 10}, order
    runs = [len(list(group)) for _, group in itertools.groupby(order)]
    assert max(runs) <= 2, order  # they alternate (a tie may put two in a row)


def test_within_a_tenant_priority_then_age(redis_url: str) -> None:
    async def body(limiter: Callable[..., Limiter]) -> list[int]:
        lim = limiter(ONE_AT_A_TIME)
        blocker = await lim.acquire(1, priority=5, enqueued_at_s=time.time(), tenant="t")
        got: list[int] = []

        async def call(priority: int, at: float) -> None:
            lease = await lim.acquire(1, priority=priority, enqueued_at_s=at, tenant="t")
            got.append(priority)
            await lim.release(lease, used_tokens=None)

        now = time.time()
        tasks = [asyncio.create_task(call(p, now + i)) for i, p in enumerate([9, 5, 0, 5, 1])]
        await asyncio.sleep(0.2)
        await lim.release(blocker, used_tokens=None)
        await asyncio.gather(*tasks)
        return got

    assert run_limiters(redis_url, body) == [0, 1, 5, 5, 9]


def test_a_tenant_held_by_its_own_cap_blocks_no_one(redis_url: str) -> None:
    """capped's max_inflight of 1 holds fleet-wide; open gets every other slot, though capped is ahead in line."""
    shares = {"capped": Share(weight=10, limits=Limits(max_inflight=1)), "open": Share()}

    async def body(limiter: Callable[..., Limiter]) -> tuple[int, int, int, int]:
        lims = [limiter(Limits(max_inflight=4), tenants=shares) for _ in range(2)]
        running: Counter[str] = Counter()
        peak: Counter[str] = Counter()
        done: Counter[str] = Counter()

        async def call(lim: Limiter, tenant: str) -> None:
            lease = await lim.acquire(1, priority=5, enqueued_at_s=time.time(), tenant=tenant)
            running[tenant] += 1
            peak[tenant] = max(peak[tenant], running[tenant])
            peak["fleet"] = max(peak["fleet"], running["capped"] + running["open"])
            await asyncio.sleep(0.05)
            running[tenant] -= 1
            done[tenant] += 1
            await lim.release(lease, used_tokens=None)

        tasks = [asyncio.create_task(call(lims[i % 2], "capped")) for i in range(8)]
        await asyncio.sleep(0.05)
        tasks += [asyncio.create_task(call(lims[i % 2], "open")) for i in range(24)]
        await asyncio.gather(*tasks)
        return peak["capped"], peak["open"], done["open"], peak["fleet"]

    capped, open_, done, fleet = run_limiters(redis_url, body)
    assert fleet <= 4
    assert capped == 1  # its own cap, fleet-wide, though it is ahead in line with weight 10
    assert open_ >= 3  # the other slots: at least three all the time capped waited (four between its calls)
    assert done == 24


def test_a_tenant_rpm_holds_fleet_wide_and_says_so(redis_url: str) -> None:
    shares = {"slow": Share(limits=Limits(rpm=3, window_ms=1500))}

    async def body(limiter: Callable[..., Limiter]) -> tuple[list[Lease], float]:
        lims = [limiter(Limits(window_ms=1500), tenants=shares) for _ in range(2)]
        start = time.monotonic()
        leases = await asyncio.gather(
            *(lims[i % 2].acquire(1, priority=5, enqueued_at_s=time.time(), tenant="slow") for i in range(4))
        )
        return list(leases), time.monotonic() - start

    leases, took = run_limiters(redis_url, body)
    assert took >= 1.4  # the fourth waited for the first to leave the tenant's 1.5 s window
    assert sorted(lease.limit for lease in leases)[-1] == "tenant_rpm"


def test_calls_spread_over_accounts_and_a_pinned_tenant_stays_on_its_own(redis_url: str) -> None:
    accounts = {"main": Limits(max_inflight=2), "spare": Limits(max_inflight=2)}
    shares = {"pinned": Share(accounts=("spare",))}

    async def body(limiter: Callable[..., Limiter]) -> tuple[list[str], list[str], bool]:
        lim = limiter(Limits(), accounts=accounts, tenants=shares)
        free = [await lim.acquire(1, priority=5, enqueued_at_s=time.time()) for _ in range(4)]
        # Both full: a fifth waits until a slot frees, on the account that freed it.
        fifth = asyncio.create_task(lim.acquire(1, priority=5, enqueued_at_s=time.time()))
        await asyncio.sleep(0.2)
        blocked = not fifth.done()
        main = next(lease for lease in free if lease.account == "main")
        await lim.release(main, used_tokens=None)
        got = await asyncio.wait_for(fifth, 5)
        for lease in free:
            if lease is not main:
                await lim.release(lease, used_tokens=None)
        pinned = [await lim.acquire(1, priority=5, enqueued_at_s=time.time(), tenant="pinned") for _ in range(2)]
        return [lease.account for lease in free] + [got.account], [lease.account for lease in pinned], blocked

    spread, pinned, blocked = run_limiters(redis_url, body)
    assert sorted(spread[:4]) == ["main", "main", "spare", "spare"]  # the most headroom first
    assert blocked and spread[4] == "main"
    assert pinned == ["spare", "spare"]


def test_an_account_out_of_rotation_is_skipped_until_it_comes_back(redis_url: str) -> None:
    accounts = {"main": Limits(), "spare": Limits()}

    async def body(limiter: Callable[..., Limiter]) -> tuple[list[str], set[str], str]:
        lim = limiter(Limits(), accounts=accounts)
        await lim.take_out("main", 1.0)
        during = [(await lim.acquire(1, priority=5, enqueued_at_s=time.time())).account for _ in range(4)]
        out = await lim.out_of_rotation()
        await lim.take_out("spare", 60)
        await asyncio.sleep(1.1)
        after = (await lim.acquire(1, priority=5, enqueued_at_s=time.time())).account
        return during, out, after

    during, out, after = run_limiters(redis_url, body)
    assert during == ["spare"] * 4
    assert out == {"main"}
    assert after == "main"


def test_a_pinned_tenant_waiting_for_its_account_lets_others_use_theirs(redis_url: str) -> None:
    accounts = {"main": Limits(max_inflight=1), "spare": Limits(max_inflight=1)}
    shares = {"pinned": Share(weight=100, accounts=("main",)), "free": Share()}

    async def body(limiter: Callable[..., Limiter]) -> str:
        lim = limiter(Limits(), accounts=accounts, tenants=shares)
        held = await lim.acquire(1, priority=5, enqueued_at_s=time.time(), tenant="pinned")
        assert held.account == "main"
        waiting = asyncio.create_task(lim.acquire(1, priority=0, enqueued_at_s=time.time() - 60, tenant="pinned"))
        await asyncio.sleep(0.1)
        other = await asyncio.wait_for(lim.acquire(1, priority=9, enqueued_at_s=time.time(), tenant="free"), 3)
        assert not waiting.done()
        await lim.release(held, used_tokens=None)
        assert (await asyncio.wait_for(waiting, 3)).account == "main"
        return other.account

    assert run_limiters(redis_url, body) == "spare"


def test_a_tenant_pinned_to_an_account_the_node_lacks_is_refused_at_start(redis_url: str) -> None:
    async def body(limiter: Callable[..., Limiter]) -> None:
        limiter(Limits(), accounts={"main": Limits()}, tenants={"t": Share(accounts=("gone",))})

    with pytest.raises(ValueError, match=r"tenants\.t\.accounts names gone"):
        run_limiters(redis_url, body)
    with pytest.raises(UnknownAccount):

        async def cool(limiter: Callable[..., Limiter]) -> None:
            await limiter(Limits()).cooldown(1.0, account="nope")

        run_limiters(redis_url, cool)
