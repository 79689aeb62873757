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

Waiting is ordered and does not spin: each process queues its waiters by (priority,
enqueue time) and only its best waiter asks Redis, registered in a fleet-wide waiting list
that the script serves head first. A waiter sleeps for exactly the time the script reports
(until enough of the oldest grants have left the window, the cool-down ends or a lease expires),
or until a release or grant is announced on the wake channel.

The state lives under ``P:limit:*`` (``P`` = prefix): ``worker/limiter_state.py`` owns those key
names and the windows' arithmetic, shared by these scripts and the exporter. Times are Redis'
own clock (``TIME``), so node clocks may differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker.errors import CapacityWaitTimeout
from worker.limiter_state import MAX_WINDOW_MS, WINDOW_MS, LimiterKeys
from worker.ratelimit_scripts import ACQUIRE_LUA, COOLDOWN_LUA, LEAVE_LUA, RELEASE_LUA, RENEW_LUA

log = logging.getLogger("moonq.limiter")


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


@dataclass
class Lease:
    """Capacity granted to one upstream call; give it back with ``Limiter.release``."""

    id: str
    reserved_tokens: int
    waited_s: float = 0.0
    limit: str = "none"  # the limit that held the call back last: rpm, tpm, inflight, cooldown, queued


@dataclass(order=True)
class _Waiter:
    rank: float
    seq: int
    cost: int = field(compare=False)
    future: asyncio.Future[Lease] = field(compare=False)
    since: float = field(compare=False, default=0.0)
    held_by: str = field(compare=False, default="none")


class Limiter:
    """One per process: queues the process's waiters and asks Redis on behalf of the best one."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        limits: Limits,
        *,
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
        self._id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._acquire = redis.register_script(ACQUIRE_LUA)
        self._release = redis.register_script(RELEASE_LUA)
        self._cooldown = redis.register_script(COOLDOWN_LUA)
        self._renew = redis.register_script(RENEW_LUA)
        self._leave = redis.register_script(LEAVE_LUA)
        self._heap: list[_Waiter] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._leases: set[str] = set()
        self._registered = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pump()), asyncio.create_task(self._renew_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(RedisError):
            await self._leave(keys=[self.keys.waiters, self.keys.alive], args=[self._id, self.wake_channel])

    def wake(self) -> None:
        """Capacity may have changed somewhere in the fleet: let the best waiter ask again."""
        self._wake.set()

    async def acquire(self, cost_tokens: int, *, priority: int, enqueued_at_s: float) -> Lease:
        """Wait, in (aged priority, enqueue time) order, until the fleet has room for one call of this cost.

        Raises:
            CapacityWaitTimeout: no room within ``max_wait_s``; the waiter has left the line.
        """
        loop = asyncio.get_running_loop()
        if self.limits.tpm:
            # A call bigger than a whole window's tokens (an absurd max_completion_tokens) reserves the
            # window: it goes alone once the window is empty, instead of waiting for room that never comes.
            cost_tokens = min(cost_tokens, self.limits.tpm)
        order = rank(priority, enqueued_at_s, self.priority_aging_s)
        waiter = _Waiter(order, next(self._seq), cost_tokens, loop.create_future(), loop.time())
        heapq.heappush(self._heap, waiter)
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

    async def release(self, lease: Lease, used_tokens: int | None) -> None:
        """Give the slot back and refund ``reserved - used`` tokens (nothing when usage is unknown)."""
        self._leases.discard(lease.id)
        refund = 0 if used_tokens is None else lease.reserved_tokens - used_tokens
        keys = [self.keys.inflight] + ([self.keys.tpm.units] if self.limits.tpm else [])
        await self._release(keys=keys, args=[lease.id, refund, self.wake_channel])

    async def cooldown(self, delay_s: float) -> None:
        """Hold every caller in the fleet back for ``delay_s`` (the upstream said 429)."""
        await self._cooldown(keys=[self.keys.cooldown], args=[max(1, int(delay_s * 1000)), self.wake_channel])

    async def _pump(self) -> None:
        while True:
            try:
                await self._serve_head()
            except asyncio.CancelledError:
                raise
            except RedisError:
                log.warning("limiter cannot reach Redis; waiters keep waiting", exc_info=True)
                await asyncio.sleep(1.0)

    async def _serve_head(self) -> None:
        while self._heap and self._heap[0].future.done():  # cancelled while waiting
            heapq.heappop(self._heap)
        if not self._heap:
            if self._registered:
                await self._leave(keys=[self.keys.waiters, self.keys.alive], args=[self._id, self.wake_channel])
                self._registered = False
            self._wake.clear()
            await self._wake.wait()
            return
        head = self._heap[0]
        lease_id = uuid.uuid4().hex
        self._wake.clear()  # before asking: a wake during the call must not be lost
        granted, wait_ms, reason = await self._ask(head, lease_id)
        self._registered = not granted
        if granted:
            # Not heappop: a better waiter may have arrived during the call and now be on top.
            self._heap.remove(head)
            heapq.heapify(self._heap)
            waited = asyncio.get_running_loop().time() - head.since
            lease = Lease(lease_id, head.cost, waited, head.held_by)
            if head.future.done():  # cancelled during the call: give it straight back
                await self.release(lease, used_tokens=0)
            else:
                if self.limits.max_inflight:  # only then did the script put it in the in-flight set
                    self._leases.add(lease_id)
                head.future.set_result(lease)
            return
        head.held_by = reason.decode() if isinstance(reason, bytes) else str(reason)
        # Sleep for exactly the time the script named, or until woken (the renewals keep our place in
        # line meanwhile). Behind another process's waiter nothing is named: ask again well within the
        # time its registration lives, in case that process died without a word.
        timeout = self.waiter_ttl_s / 3 if wait_ms < 0 else wait_ms / 1000
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _ask(self, head: _Waiter, lease_id: str) -> list[Any]:
        """One ``ACQUIRE_LUA`` call for ``head``: the line, the cool-down, the in-flight cap, every rate window."""
        keys = [self.keys.inflight, self.keys.cooldown, self.keys.waiters, self.keys.alive]
        args: list[str | int | float] = [
            self._id,
            head.rank,
            int(self.waiter_ttl_s * 1000),
            lease_id,
            int(self.lease_ttl_s * 1000),
            self.limits.max_inflight or 0,
            self.wake_channel,
            self.limits.window_ms,
        ]
        for axis, limit, units in self.limits.windows(head.cost):
            window = self.keys.window(axis)
            keys += [window.grants, window.units]
            args += [axis, limit, units]
        answer: list[Any] = await self._acquire(keys=keys, args=args)
        return answer

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self.lease_ttl_s, self.waiter_ttl_s) / 3)
            if not self._leases and not self._registered:
                continue
            try:
                await self._renew_once()
            except RedisError:
                log.warning("limiter could not renew its leases", exc_info=True)

    async def _renew_once(self) -> None:
        """Renew the leases of calls in flight (adding back any that expired meanwhile) and the waiter."""
        leases = list(self._leases)
        await self._renew(
            keys=[self.keys.inflight, self.keys.waiters, self.keys.alive],
            args=[
                int(self.lease_ttl_s * 1000),
                self._id if self._registered else "",
                int(self.waiter_ttl_s * 1000),
                *leases,
            ],
        )
        # The renewal adds back what it names, so a lease released while it was on its way (its release
        # may have reached Redis first) is given back once more; a second release is a no-op otherwise.
        for lease_id in leases:
            if lease_id not in self._leases:
                await self.release(Lease(lease_id, reserved_tokens=0), used_tokens=None)  # refunds nothing
