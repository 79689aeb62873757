"""The fleet limiter's state in Redis: its key names and its windows' arithmetic, in one place.

Everything that reads or writes ``P:{limit}:*`` (``P`` = prefix; one hash tag, so every key of the
limiter is in one slot of a Redis Cluster and a grant checks all its scopes in one script) takes its
names from ``LimiterKeys`` and its window arithmetic from here: the limiter's Lua scripts
(``worker/ratelimit_scripts.py``, through ``limiter_lua``) and the exporter's gauges
(``worker/exporter.py``, through ``window_used``), so the two cannot drift apart.

Key families:

    P:{limit}:<scope>:<axis>        zset lease id -> grant time (Redis ms): the grants of the last
                                  window on a rate axis (``rpm``, ``tpm``) of a scope. Every acquire
                                  that checks it first trims what has left the window.
    P:{limit}:<scope>:<axis>:units  hash lease id -> the units that grant holds (1 request; its tokens,
                                  lowered by the refund at release), and ``sum`` -> their total.
    P:{limit}:<scope>:inflight      zset lease id -> expiry ms: the calls in flight in a scope.
    P:{limit}:<scope>:cooldown      string: until when (ms) an account's callers hold back after a 429.
    P:{limit}:<scope>:out           string: until when (ms) an account is out of rotation (balance
                                  gone, key refused).
    P:{limit}:waiters               zset ``<process>|<tenant>`` -> rank of that process's best waiter
                                  of that tenant (the fleet-wide waiting line).
    P:{limit}:alive                 zset ``<process>|<tenant>`` -> expiry ms of its place in that line.
    P:{limit}:vtime                 hash tenant -> the virtual time its last grant finished (fair share).
    P:{limit}:vclock                string: the virtual time of the fleet's last grant.
    P:{limit}:weights               hash tenant -> its weight, as its waiters last said.
    P:{limit}:parked                zset tenant -> until when (ms) it is out of the line: held back by
                                  its own limits or its pinned accounts, it blocks no one.
    P:{limit}:wake                  pub/sub channel: capacity may have changed.

Scopes: ``fleet`` is the single account of a node without an accounts file (its keys keep the
names they had before accounts: ``P:{limit}:inflight``, ``P:{limit}:cooldown``, ``P:{limit}:fleet:rpm``),
and with an accounts file the optional cap over all accounts; ``account:<name>`` is one upstream
account; ``tenant:<name>`` a tenant's own limits. A window's two keys expire ``IDLE_GRACE_MS`` after
their grants have all left the window, so an idle fleet keeps nothing, and a busy one keeps at most
the grants of one window. Times are Redis' own clock (``TIME``), so node clocks may differ. Why the
window is 61.5 s rather than 60 is the design note in ``worker/ratelimit.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from string import Template

# The limiter's window: 60 s, the upstream's, plus 1.5 s for the time from a grant to the upstream
# counting the request (worker/ratelimit.py). Steady use is 60/61.5 = 97.6% of a limit.
WINDOW_MS = 61_500
# Above 60/0.97 s a saturated fleet would use less than 97% of its limits.
MAX_WINDOW_MS = 61_855
# A window's keys outlive its newest grant by the window plus this, then expire.
IDLE_GRACE_MS = 1_000
# The field of a window's units hash that holds their total (lease ids are 32 hex digits).
SUM_FIELD = "sum"
# A refused ask computes its wait from at most this many of the oldest grants: past them it is told
# to ask again when the last one it looked at has left (at most once per this many grants).
WAIT_SCAN = 256
# Expired grants are trimmed this many at a time (Lua's unpack takes a few thousand values at most).
TRIM_BATCH = 1_000
# The scope of the fleet-wide limits (and of the one account of a node without an accounts file).
FLEET = "fleet"
# How long the fair-share clocks outlive the fleet's last grant (an idle day starts everyone afresh).
VTIME_TTL_MS = 86_400_000
# A grant advances its tenant's virtual time by VTIME_UNIT / weight (integers: exact in Redis and Lua).
VTIME_UNIT = 720_720  # divisible by every weight from 1 to 16


@dataclass(frozen=True)
class WindowKeys:
    """The two keys of one sliding window: the grants by time, and the units each holds."""

    grants: str
    units: str


@dataclass(frozen=True)
class LimiterKeys:
    """The limiter's key and channel names under one prefix."""

    root: str
    inflight: str
    cooldown: str
    waiters: str
    alive: str
    wake: str
    vtime: str
    vclock: str
    weights: str
    parked: str

    @classmethod
    def for_prefix(cls, prefix: str) -> LimiterKeys:
        p = f"{prefix}:{{limit}}"  # one hash tag: every grant checks all scopes in one script, one slot
        return cls(
            root=p,
            inflight=f"{p}:inflight",
            cooldown=f"{p}:cooldown",
            waiters=f"{p}:waiters",
            alive=f"{p}:alive",
            wake=f"{p}:wake",
            vtime=f"{p}:vtime",
            vclock=f"{p}:vclock",
            weights=f"{p}:weights",
            parked=f"{p}:parked",
        )

    def scope_inflight(self, scope: str) -> str:
        """The in-flight leases of ``scope`` (the fleet's keep their old name)."""
        return self.inflight if scope == FLEET else f"{self.root}:{scope}:inflight"

    def scope_cooldown(self, scope: str) -> str:
        """The 429 cool-down of an account scope (the fleet's keeps its old name)."""
        return self.cooldown if scope == FLEET else f"{self.root}:{scope}:cooldown"

    def scope_out(self, scope: str) -> str:
        """Until when an account scope is out of rotation."""
        return f"{self.root}:{scope}:out"

    def window(self, axis: str, scope: str = FLEET) -> WindowKeys:
        """The window of rate axis ``axis`` (``rpm``, ``tpm``) in ``scope``."""
        base = f"{self.root}:{scope}:{axis}"
        return WindowKeys(grants=base, units=f"{base}:units")

    @property
    def rpm(self) -> WindowKeys:
        return self.window("rpm")

    @property
    def tpm(self) -> WindowKeys:
        return self.window("tpm")


def window_used(stored_sum: bytes | str | int | None, expired_units: Sequence[bytes | str | int | None]) -> int:
    """The units a window holds: its stored ``sum`` less the units of grants that have left it.

    ``expired_units`` are the units of the grants whose time is at or before ``now - window``
    (``HMGET`` of the ids ``ZRANGEBYSCORE grants -inf now-window`` gives); a missing window holds
    0. The result is above the limit only while usage exceeds its estimates. Same arithmetic as the
    trimming in ``WINDOW_LUA``'s ``window_check``.
    """
    return int(stored_sum or 0) - sum(int(units or 0) for units in expired_units)


# The Lua twin of window_used (trimming as it goes), with the wait and the two writes a window
# takes. Each function names the keys of one window: zkey (grants by time) and hkey (units, sum).
WINDOW_LUA = """
-- Trims the grants at or before now - window_ms; returns the units left and the ms until `need` more
-- fit under `limit` (0: now), the time when enough of the oldest grants will have left.
local function window_check(zkey, hkey, now, window_ms, limit, need)
  local cutoff = now - window_ms
  local used = tonumber(redis.call('HGET', hkey, '$sum_field') or '0')
  local trimmed = false
  while true do
    local old = redis.call('ZRANGEBYSCORE', zkey, '-inf', cutoff, 'LIMIT', 0, $trim_batch)
    if #old == 0 then break end
    local units = redis.call('HMGET', hkey, unpack(old))
    for i = 1, #old do
      used = used - (tonumber(units[i]) or 0)
    end
    redis.call('ZREM', zkey, unpack(old))
    redis.call('HDEL', hkey, unpack(old))
    trimmed = true
  end
  if trimmed then
    if redis.call('EXISTS', zkey) == 0 then
      redis.call('DEL', hkey)
    else
      redis.call('HSET', hkey, '$sum_field', used)
    end
  end
  local excess = used + need - limit
  if excess <= 0 then
    return used, 0
  end
  local oldest = redis.call('ZRANGE', zkey, 0, $wait_scan - 1, 'WITHSCORES')
  local at = now
  if #oldest > 0 then
    local ids = {}
    for i = 1, #oldest, 2 do
      ids[#ids + 1] = oldest[i]
    end
    local units = redis.call('HMGET', hkey, unpack(ids))
    for i = 1, #ids do
      excess = excess - (tonumber(units[i]) or 0)
      at = tonumber(oldest[2 * i])
      if excess <= 0 then break end
    end
  end
  return used, at + window_ms - now
end

-- Records a grant of `units` at `now`; both keys expire once it has left the window.
local function window_add(zkey, hkey, now, window_ms, id, units)
  redis.call('ZADD', zkey, now, id)
  redis.call('HSET', hkey, id, units)
  redis.call('HINCRBY', hkey, '$sum_field', units)
  redis.call('PEXPIRE', zkey, window_ms + $idle_grace_ms)
  redis.call('PEXPIRE', hkey, window_ms + $idle_grace_ms)
end

-- Lowers the units of grant `id` by `refund` (raises them for a negative one), never below 0; a grant
-- that has left the window is not counted any more, and gets nothing.
local function window_refund(hkey, id, refund)
  local units = tonumber(redis.call('HGET', hkey, id))
  if units == nil then return end
  local left = math.max(0, units - refund)
  redis.call('HSET', hkey, id, left)
  redis.call('HINCRBY', hkey, '$sum_field', left - units)
end
"""

_CONSTANTS = {
    "sum_field": SUM_FIELD,
    "wait_scan": str(WAIT_SCAN),
    "trim_batch": str(TRIM_BATCH),
    "idle_grace_ms": str(IDLE_GRACE_MS),
    "vtime_ttl_ms": str(VTIME_TTL_MS),
}
_LUA_NAMES = {**_CONSTANTS, "window_functions": Template(WINDOW_LUA.strip()).substitute(_CONSTANTS)}


def limiter_lua(script: str) -> str:
    """``script`` with ``$window_functions`` and the constants (``$sum_field``, ``$wait_scan``, …) filled in.

    ``$window_functions`` defines the Lua functions ``window_check``, ``window_add`` and
    ``window_refund``. Lua's own braces are untouched (``string.Template`` only reads ``$``).

    Raises:
        KeyError: the script names any other placeholder.
    """
    return Template(script).substitute(_LUA_NAMES)
