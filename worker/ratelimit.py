"""The fleet-wide limiter: requests/min, tokens/min and concurrent requests, shared in Redis.

Every node and process asks the same Redis, and check-and-reserve is one Lua script
(``ACQUIRE_LUA``), so no two callers can both take the last unit of capacity (the overshoot
LiteLLM's multi-instance limits had for years came from separate read and write steps).

Rates are true sliding windows, like the upstream's own minute (docs/moonshot-api.md §8). Each
grant is recorded with its Redis time, and a call is granted iff the units granted in the last
``W`` plus its own are at most the limit ``L``: after an idle minute ``L`` calls go at once, and no
window of ``W`` ever holds more than ``L``. ``W`` is 61.5 s (``WINDOW_MS``), not 60: the upstream
counts a request when it *arrives*, a little after its grant (a new connection, a busy node; the
limiter benchmark saw a cold burst arrive ~0.15 s behind its grants). A grant that replaces one
leaving the window reaches the upstream at least ``W`` after that one's grant, so their arrivals
stay more than 60 s apart unless the older one lagged its grant by 1.5 s more than the newer one.
The margin costs throughput: a saturated fleet grants ``L`` per ``W``, 60/61.5 = 97.6% of ``L`` per
minute, and ``W`` must stay below 60/0.97 s (``MAX_WINDOW_MS``) to keep that above 97%. Tests pass a
shorter window through ``Limits.window_ms``.

TPM reserves what Moonshot checks, the prompt estimate plus the completion budget
(``max_completion_tokens``, or the model's default), and ``release`` refunds the difference
once the real usage is known: the grant's own entry in the window drops to what was used (or
rises, when the estimate was low), so a refund frees exactly what its grant took and never
creates credit. A single reservation larger than ``L`` (an absurd ``max_completion_tokens``)
reserves ``L``: it goes alone, once the window is empty, and holds the fleet's tokens until its
release refunds them; it waits at most one window, never forever.

In-flight slots are leases that expire unless renewed, so a node that dies gives its slots back
within ``lease_ttl_s``; a live node whose renewals came too late (Redis paused, its loop stalled)
adds the leases of its running calls back at the next renewal, so a long stream is counted again.
A 429 from the upstream sets a shared cool-down that every caller honours.

Waiting is ordered and does not spin: each process queues its waiters per tenant by (aged
priority, enqueue time) and only each tenant's best waiters ask Redis (up to ``ASK_BATCH`` in one
call, granted in order, each as if it had asked alone, until one cannot go: a burst of job starts
costs a few calls, not one round trip per job), registered in a fleet-wide
waiting line (one member per process and tenant) that the script serves head first. Between
tenants the head is chosen by start-time fair queueing: each grant advances its tenant's virtual
time by 1/weight (``VTIME_UNIT`` / weight, integers), the waiting tenant whose next grant starts
earliest (its last finish, or the fleet's clock if that is later: an idle tenant banks nothing)
goes first, so shares follow the weights and an idle tenant's share goes to the others. A tenant
held back by its own limits, or by the accounts it is pinned to, is parked out of the line until
its time (a release brings every parked tenant back to ask again), so it blocks no one; a head held
back by the fleet's own limits waits at the front, so small calls cannot starve a large one.
A waiter sleeps for exactly the time the script reports (until enough of the oldest grants have
left the window, the cool-down ends, a lease expires or a parked tenant comes back), or until a
release, grant or park is announced on the wake channel.

Accounts (``worker/accounts.py``) are scopes of their own: windows, in-flight set, cool-down and an
out-of-rotation time each. A grant takes the account, among those the tenant may use, with room now
and the largest fraction left on its tightest limit, and enters the call in the fleet cap's, the
tenant's and that account's windows in the same script, so one grant checks all three atomically.

The state lives under ``P:{limit}:*`` (``P`` = prefix): ``worker/limiter_state.py`` owns those key
names and the windows' arithmetic, shared by these scripts and the exporter. Times are Redis'
own clock (``TIME``), so node clocks may differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import math
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from moonq.cancel import cancel_and_wait
from moonq.record import DEFAULT_TENANT
from moonq.tenants import Tenants
from worker.errors import CapacityWaitTimeout, UnknownAccount
from worker.limiter_state import FLEET, MAX_WINDOW_MS, VTIME_UNIT, WINDOW_MS, LimiterKeys
from worker.ratelimit_scripts import ACQUIRE_LUA, COOLDOWN_LUA, LEAVE_LUA, RELEASE_LUA, RENEW_LUA

log = logging.getLogger("moonq.limiter")

# The one account of a node without an accounts file (worker/accounts.py).
DEFAULT_ACCOUNT = "default"
# A tenant's waiters one ask may grant. Asked one at a time, a burst of 200 job starts on a busy node
# waited for 200 round trips in a row (a mean limiter wait of 130-170 ms per job); one script call grants
# a batch in the same order, and holds Redis no longer than the 64 calls it saves would have, in all.
ASK_BATCH = 64


@dataclass(frozen=True)
class Limits:
    """Fleet limits; None means no limit on that axis. ``window_ms`` is the rate window (tests shorten it)."""

    rpm: int | None = None
    tpm: int | None = None
    max_inflight: int | None = None
    window_ms: int = WINDOW_MS

    def __post_init__(self) -> None:
        if not 0 < self.window_ms < MAX_WINDOW_MS:
            raise ValueError(f"window_ms must be above 0 and below {MAX_WINDOW_MS}; got {self.window_ms}")

    @property
    def rates(self) -> list[tuple[str, int]]:
        """(axis, limit) of each configured rate axis: ``rpm``, ``tpm``."""
        return [(axis, limit) for axis, limit in (("rpm", self.rpm), ("tpm", self.tpm)) if limit]

    def windows(self, cost_tokens: int) -> list[tuple[str, int, int]]:
        """(axis, limit, units) for each configured rate axis, for one call reserving ``cost_tokens``."""
        return [(axis, limit, cost_tokens if axis == "tpm" else 1) for axis, limit in self.rates]


def rank(priority: int, enqueued_at_s: float, aging_s: float = 0.0) -> float:
    """Waiting-line order, lowest first (exact in a double).

    With ``aging_s`` > 0 priorities age: one level is worth ``aging_s`` of waiting, so a job of
    priority 9 enqueued ``9 * aging_s`` before a job of priority 0 goes first, and nothing waits
    forever behind a stream of more urgent work. ``aging_s`` = 0: strict priority, then arrival.
    """
    if aging_s > 0:
        return math.floor(enqueued_at_s * 1000) + priority * math.floor(aging_s * 1000)
    return priority * 1e13 + math.floor(enqueued_at_s * 1000)


@dataclass(frozen=True)
class Share:
    """A tenant's place in the fleet: its fair-share weight, its own fleet-wide limits, its accounts."""

    weight: int = 1
    limits: Limits = field(default_factory=Limits)
    # The accounts its calls may use (None: any), in the order they are preferred on a tie.
    accounts: tuple[str, ...] | None = None


def _score(rank: float) -> str:
    """A rank as the waiting line's score, every digit kept (a Lua number would round it)."""
    return repr(int(rank)) if rank == int(rank) else repr(rank)


def shares(tenants: Tenants) -> dict[str, Share]:
    """Each configured tenant's ``Share``: its weight, its own rpm/tpm/max_inflight, its pinned accounts."""
    out = {}
    for name in tenants.names:
        entry = tenants.get(name)
        accounts = tuple(entry.accounts) if entry.accounts else None
        out[name] = Share(entry.weight, Limits(entry.rpm, entry.tpm, entry.max_inflight), accounts)
    return out


@dataclass
class Lease:
    """Capacity granted to one upstream call; give it back with ``Limiter.release``."""

    id: str
    reserved_tokens: int
    waited_s: float = 0.0
    limit: str = "none"  # the limit that held the call back last: rpm, tpm, inflight, cooldown, queued, tenant_*
    account: str = DEFAULT_ACCOUNT
    tenant: str = DEFAULT_TENANT
    slots: tuple[str, ...] = ()  # the in-flight sets it holds a place in
    units: tuple[str, ...] = ()  # the token windows' units hashes it was entered in


@dataclass(order=True)
class _Waiter:
    rank: float
    seq: int
    cost: int = field(compare=False)
    future: asyncio.Future[Lease] = field(compare=False)
    since: float = field(compare=False, default=0.0)
    held_by: str = field(compare=False, default="none")
    counted: bool = field(compare=False, default=False)  # in ``Limiter.waiting()``: an ask held it back


@dataclass(frozen=True)
class _Account:
    name: str
    scope: str
    limits: Limits


class Limiter:
    """One per process: queues the process's waiters by tenant and asks Redis on behalf of each tenant's best.

    ``limits`` are the fleet's. With ``accounts`` (name -> limits, in preference order) each account
    is a scope of its own and ``limits`` is an optional cap over all of them; without, the fleet is
    one account, ``default``, whose limits are ``limits``. ``tenants`` gives each tenant its
    ``Share``; a tenant not named has weight 1, no limits of its own, and any account.
    """

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        limits: Limits,
        *,
        accounts: Mapping[str, Limits] | None = None,
        tenants: Mapping[str, Share] | None = None,
        lease_ttl_s: float = 15.0,
        waiter_ttl_s: float = 10.0,
        priority_aging_s: float = 0.0,
        max_wait_s: float | None = None,
    ) -> None:
        self._redis = redis
        self.limits = limits
        self.priority_aging_s = priority_aging_s
        self.max_wait_s = max_wait_s  # None: a waiter waits as long as it takes
        self.lease_ttl_s = lease_ttl_s
        self.waiter_ttl_s = waiter_ttl_s
        self.keys = LimiterKeys.for_prefix(prefix)
        self.wake_channel = self.keys.wake
        if accounts is None:
            self._accounts = {DEFAULT_ACCOUNT: _Account(DEFAULT_ACCOUNT, FLEET, limits)}
            self._fleet: Limits | None = None
        else:
            if not accounts:
                raise ValueError("accounts: at least one")
            self._accounts = {name: _Account(name, f"account:{name}", lim) for name, lim in accounts.items()}
            self._fleet = limits if (limits.rpm or limits.tpm or limits.max_inflight) else None
        self._shares = dict(tenants or {})
        for tenant, share in self._shares.items():
            unknown = [name for name in share.accounts or () if name not in self._accounts]
            if unknown:
                raise ValueError(
                    f"tenants.{tenant}.accounts names {', '.join(unknown)}, which this node's accounts do not have"
                )
        self._id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._acquire = redis.register_script(ACQUIRE_LUA)
        self._release = redis.register_script(RELEASE_LUA)
        self._cooldown = redis.register_script(COOLDOWN_LUA)
        self._renew = redis.register_script(RENEW_LUA)
        self._leave = redis.register_script(LEAVE_LUA)
        self._heaps: dict[str, list[_Waiter]] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._leases: dict[str, tuple[str, ...]] = {}  # lease id -> its in-flight sets
        self._waiting: dict[str, int] = {}  # tenant -> calls waiting in acquire()
        self._registered: set[str] = set()  # tenants with a place in the fleet's line
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def account_names(self) -> tuple[str, ...]:
        return tuple(self._accounts)

    def share(self, tenant: str) -> Share:
        return self._shares.get(tenant) or Share()

    def candidates(self, tenant: str) -> tuple[str, ...]:
        """The accounts ``tenant``'s calls may use, in preference order."""
        pinned = self.share(tenant).accounts
        return tuple(name for name in self._accounts if pinned is None or name in pinned)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pump()), asyncio.create_task(self._renew_loop())]

    async def stop(self) -> None:
        # The flag as well as the cancel: a cancel that arrives while the pump's Redis call (LEAVE_LUA) is
        # under way is lost in redis-py at times (seen on Python 3.11 with redis-py 8.1), and the pump
        # would then wait for a wake for ever.
        self._stopping = True
        self._wake.set()
        await cancel_and_wait(self._tasks)
        for tenant in list(self._registered):
            with contextlib.suppress(RedisError):
                await self._leave(
                    keys=[self.keys.waiters, self.keys.alive], args=[self._member(tenant), self.wake_channel]
                )
        self._registered.clear()

    def wake(self) -> None:
        """Capacity may have changed somewhere in the fleet: let the best waiters ask again."""
        self._wake.set()

    def waiting(self) -> dict[str, int]:
        """How many calls of each tenant this process has waiting for capacity now: asked for and held back
        (safe from any thread). A call that goes at its first ask never counts: counting it for the round
        trip of that ask made a 2-slot node take its tenants' queues about 1:1 instead of by weight (the
        broker's ``TenantCycle`` puts the tenant with the fewest waiting first)."""
        return self._waiting.copy()  # one C-level copy: atomic under the GIL

    async def acquire(
        self, cost_tokens: int, *, priority: int, enqueued_at_s: float, tenant: str = DEFAULT_TENANT
    ) -> Lease:
        """Wait until the fleet, one of the tenant's accounts and the tenant itself have room for one call.

        Within a tenant, waiters go in (aged priority, enqueue time) order; between tenants, in
        proportion to their weights (``worker/ratelimit.py``'s design note).

        Raises:
            CapacityWaitTimeout: no room within ``max_wait_s``; the waiter has left the line.
        """
        loop = asyncio.get_running_loop()
        # A call bigger than a whole window's tokens (an absurd max_completion_tokens) reserves the
        # window: it goes alone once the window is empty, instead of waiting for room that never comes.
        caps = [lim.tpm for lim in self._scopes_limits(tenant) if lim.tpm]
        if caps:
            cost_tokens = min(cost_tokens, min(caps))
        order = rank(priority, enqueued_at_s, self.priority_aging_s)
        waiter = _Waiter(order, next(self._seq), cost_tokens, loop.create_future(), loop.time())
        heapq.heappush(self._heaps.setdefault(tenant, []), waiter)
        self._wake.set()
        try:
            async with asyncio.timeout(self.max_wait_s):
                return await asyncio.shield(waiter.future)
        except TimeoutError:
            waiter.future.cancel()  # the pump drops it; a grant that raced the deadline is given back below
            if waiter.future.done() and not waiter.future.cancelled():
                await self.release(waiter.future.result(), used_tokens=0)
            raise CapacityWaitTimeout(
                f"no fleet capacity within {self.max_wait_s:g} s (MOONQ_CAPACITY_WAIT_S); last held back by"
                f" {waiter.held_by}; no request was sent"
            ) from None
        except asyncio.CancelledError:
            waiter.future.cancel()
            if waiter.future.done() and not waiter.future.cancelled():
                await self.release(waiter.future.result(), used_tokens=0)
            raise
        finally:
            if waiter.counted:
                left = self._waiting[tenant] - 1
                if left:
                    self._waiting[tenant] = left
                else:
                    del self._waiting[tenant]

    async def release(self, lease: Lease, used_tokens: int | None) -> None:
        """Give the slot back and refund ``reserved - used`` tokens (nothing when usage is unknown)."""
        self._leases.pop(lease.id, None)
        refund = 0 if used_tokens is None else lease.reserved_tokens - used_tokens
        await self._release(
            keys=[self.keys.parked, *lease.slots, *lease.units],
            args=[lease.id, refund, self.wake_channel, len(lease.slots)],
        )

    async def cooldown(self, delay_s: float, account: str = DEFAULT_ACCOUNT) -> None:
        """Hold every caller of ``account`` back for ``delay_s`` (the upstream said 429)."""
        key = self.keys.scope_cooldown(self._account(account).scope)
        await self._cooldown(keys=[key], args=[max(1, int(delay_s * 1000))])

    async def take_out(self, account: str, delay_s: float) -> None:
        """Take ``account`` out of rotation for ``delay_s`` fleet-wide (its balance is gone, its key refused)."""
        key = self.keys.scope_out(self._account(account).scope)
        await self._cooldown(keys=[key], args=[max(1, int(delay_s * 1000))])

    async def out_of_rotation(self) -> set[str]:
        """The accounts out of rotation now, fleet-wide."""
        names = list(self._accounts)
        sec, usec = await self._redis.time()  # apart: a cluster pipeline carries only commands on keys
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(self.keys.scope_out(self._accounts[name].scope))
            untils = await pipe.execute()
        now_ms = sec * 1000 + usec // 1000
        return {name for name, until in zip(names, untils, strict=True) if until and int(until) > now_ms}

    def _account(self, name: str) -> _Account:
        try:
            return self._accounts[name]
        except KeyError:
            raise UnknownAccount(name) from None

    def _scopes_limits(self, tenant: str) -> list[Limits]:
        """The limits a call of ``tenant`` must fit: the fleet's, the tenant's, and its smallest account's."""
        out = [self.share(tenant).limits]
        if self._fleet is not None:
            out.append(self._fleet)
        accounts = [self._accounts[name].limits for name in self.candidates(tenant)]
        tpms = [lim.tpm for lim in accounts]
        if tpms and all(tpms):
            out.append(Limits(tpm=min(t for t in tpms if t)))
        return out

    def _member(self, tenant: str) -> str:
        return f"{self._id}|{tenant}"

    async def _pump(self) -> None:
        while not self._stopping:
            try:
                await self._serve()
            except asyncio.CancelledError:
                raise
            except RedisError:
                log.warning("limiter cannot reach Redis; waiters keep waiting", exc_info=True)
                await asyncio.sleep(1.0)

    async def _serve(self) -> None:
        """Ask once for each tenant's best waiter; sleep as long as the answers say, or until woken."""
        for tenant, heap in list(self._heaps.items()):
            while heap and heap[0].future.done():  # cancelled while waiting
                heapq.heappop(heap)
            if not heap:
                del self._heaps[tenant]
                if tenant in self._registered:
                    self._registered.discard(tenant)
                    await self._leave(
                        keys=[self.keys.waiters, self.keys.alive], args=[self._member(tenant), self.wake_channel]
                    )
        if self._stopping:
            return
        if not self._heaps:
            self._wake.clear()
            await self._wake.wait()
            return
        self._wake.clear()  # before asking: a wake during the calls must not be lost
        sleep_s: float | None = None
        granted_any = False
        # Every tenant asks in each pass, also after a grant: an ask is what puts a tenant in the fleet's
        # line, and one that never asked would not be weighed against the others.
        for tenant in sorted(self._heaps, key=lambda name: self._heaps[name][0].rank):
            wait_s = await self._ask(tenant)
            if wait_s == 0:
                granted_any = True
            elif wait_s is not None:
                sleep_s = wait_s if sleep_s is None else min(sleep_s, wait_s)
        if granted_any:
            return  # serve again at once: the next waiters may go too
        if sleep_s is not None:
            # Not asyncio.wait_for: on Python 3.11 it loses a cancel that arrives as the wake does
            # (python/cpython#86296), and stop() would then wait for the pump forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep_s):
                    await self._wake.wait()

    async def _ask(self, tenant: str) -> float | None:
        """One ask for ``tenant``'s best waiters (up to ``ASK_BATCH``, granted in order until one cannot go):
        0 when any was granted, else how long to sleep (None: nothing to ask)."""
        heap = self._heaps.get(tenant, [])
        live = heapq.nsmallest(ASK_BATCH + 1, (w for w in heap if not w.future.done()))
        if not live:
            return None
        batch, after = live[:ASK_BATCH], live[ASK_BATCH:]
        spec, keys, leases = self._spec(batch, after[0] if after else None, tenant)
        count, wait_ms, reason, _head, *accounts = await self._acquire(keys=keys, args=[spec])
        reason = reason.decode() if isinstance(reason, bytes) else str(reason)
        granted = list(zip(batch, leases, accounts, strict=False))
        if granted:
            # Not heappop: better waiters may have arrived during the call and now be on top.
            gone = {id(waiter) for waiter in batch[:count]}
            heap[:] = [w for w in heap if id(w) not in gone]
            heapq.heapify(heap)
            for waiter, lease, account in granted:
                await self._granted(waiter, lease, account.decode() if isinstance(account, bytes) else account)
        if count == len(batch) and not after:
            self._registered.discard(tenant)  # its last waiter went: the grant took its place in line
            return 0.0
        self._registered.add(tenant)
        for waiter in heap:  # held back by this ask, or in line behind those that were: waiting for capacity
            if not waiter.counted and not waiter.future.done():
                waiter.counted = True
                self._waiting[tenant] = self._waiting.get(tenant, 0) + 1
        if count < len(batch) and reason != "parked":  # parked: still held back by what parked it
            for waiter in batch[count:]:
                waiter.held_by = reason
        if count:
            return 0.0  # serve again at once: the rest may go too, or learn how long to wait
        # Sleep for exactly the time the script named, or until woken (the renewals keep our place in line
        # meanwhile). Behind another process's waiter nothing is named: ask again well within the time its
        # registration lives, in case that process died without a word.
        return self.waiter_ttl_s / 3 if wait_ms < 0 else max(wait_ms, 1) / 1000

    async def _granted(self, waiter: _Waiter, lease: Lease, account: str) -> None:
        scope = self._accounts[account].scope
        acct = self._accounts[account].limits
        lease.account = account
        lease.waited_s = asyncio.get_running_loop().time() - waiter.since
        lease.limit = waiter.held_by
        if acct.max_inflight:
            lease.slots += (self.keys.scope_inflight(scope),)
        if acct.tpm:
            lease.units += (self.keys.window("tpm", scope).units,)
        if waiter.future.done():  # cancelled during the call: give it straight back
            await self.release(lease, used_tokens=0)
            return
        if lease.slots:
            self._leases[lease.id] = lease.slots
        waiter.future.set_result(lease)

    def _spec(self, batch: list[_Waiter], after: _Waiter | None, tenant: str) -> tuple[str, list[str], list[Lease]]:
        """``ACQUIRE_LUA``'s keys and spec for ``batch`` (the tenant's best waiters, best first; ``after``: the
        one that follows them), and their leases (the account's keys added once granted)."""
        keys = [
            self.keys.waiters,
            self.keys.alive,
            self.keys.vtime,
            self.keys.vclock,
            self.keys.weights,
            self.keys.parked,
        ]
        held_slots: tuple[str, ...] = ()  # what every lease holds whatever account is chosen
        held_units: tuple[str, ...] = ()

        def key(name: str) -> int:
            keys.append(name)
            return len(keys)  # Lua counts from 1

        def scope(name: str, limits: Limits, *, held: bool) -> dict[str, Any]:
            """One scope's part of the spec; ``held``: the leases are in it whatever account is chosen."""
            nonlocal held_slots, held_units
            out: dict[str, Any] = {}
            if limits.max_inflight:
                out["inflight"] = [key(self.keys.scope_inflight(name)), limits.max_inflight]
                if held:
                    held_slots += (self.keys.scope_inflight(name),)
            windows = []
            # A tpm window's units are each waiter's tokens: the script puts them in (ACQUIRE_LUA).
            for axis, limit, units in limits.windows(1):
                window = self.keys.window(axis, name)
                windows.append([key(window.grants), key(window.units), limit, units, axis])
                if held and axis == "tpm":
                    held_units += (window.units,)
            if windows:
                out["windows"] = windows
            return out

        share = self.share(tenant)
        candidates = self.candidates(tenant)
        ranks = [_score(w.rank) for w in batch] + [_score(after.rank) if after else ""]
        lease_ids = [uuid.uuid4().hex for _ in batch]
        spec: dict[str, Any] = {
            "me": self._member(tenant),
            "tenant": tenant,
            "weight": share.weight,
            "batch": [
                [lid, w.cost, ranks[i], ranks[i + 1]] for i, (lid, w) in enumerate(zip(lease_ids, batch, strict=True))
            ],
            "ttl": int(self.waiter_ttl_s * 1000),
            "lease_ttl": int(self.lease_ttl_s * 1000),
            "window": self.limits.window_ms,
            "wake": self.wake_channel,
            "unit": VTIME_UNIT,
            "pinned": len(candidates) < len(self._accounts),
            "accounts": [
                {
                    "name": name,
                    "cooldown": key(self.keys.scope_cooldown(self._accounts[name].scope)),
                    "out": key(self.keys.scope_out(self._accounts[name].scope)),
                    **scope(self._accounts[name].scope, self._accounts[name].limits, held=False),
                }
                for name in candidates
            ],
        }
        if self._fleet is not None:
            spec["fleet"] = scope(FLEET, self._fleet, held=True)
        if share.limits.rpm or share.limits.tpm or share.limits.max_inflight:
            spec["tenant_scope"] = scope(f"tenant:{tenant}", share.limits, held=True)
        leases = [
            Lease(lid, w.cost, tenant=tenant, slots=held_slots, units=held_units)
            for lid, w in zip(lease_ids, batch, strict=True)
        ]
        return json.dumps(spec, separators=(",", ":")), keys, leases

    async def _renew_loop(self) -> None:
        while not self._stopping:  # the flag too: see stop()
            await asyncio.sleep(min(self.lease_ttl_s, self.waiter_ttl_s) / 3)
            if not self._leases and not self._registered:
                continue
            try:
                await self._renew_once()
            except RedisError:
                log.warning("limiter could not renew its leases", exc_info=True)

    async def _renew_once(self) -> None:
        """Renew the leases of calls in flight (adding back any that expired meanwhile) and the places in line."""
        leases = dict(self._leases)
        members = [self._member(tenant) for tenant in self._registered]
        keys = [self.keys.waiters, self.keys.alive]
        pairs: list[str | int] = []
        for lease_id, slots in leases.items():
            for slot in slots:
                if slot not in keys:
                    keys.append(slot)
                pairs += [lease_id, keys.index(slot) + 1]
        await self._renew(
            keys=keys,
            args=[int(self.lease_ttl_s * 1000), int(self.waiter_ttl_s * 1000), len(members), *members, *pairs],
        )
        # The renewal adds back what it names, so a lease released while it was on its way (its release
        # may have reached Redis first) is given back once more; a second release is a no-op otherwise.
        for lease_id, slots in leases.items():
            if lease_id not in self._leases:
                await self.release(Lease(lease_id, reserved_tokens=0, slots=slots), used_tokens=None)
