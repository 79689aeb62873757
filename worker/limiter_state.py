"""The fleet limiter's state in Redis: its key names and its buckets' arithmetic, in one place.

Everything that reads or writes ``P:limit:*`` (``P`` = prefix) takes its names from
``LimiterKeys`` and its bucket arithmetic from here: the limiter's Lua scripts
(``worker/ratelimit_scripts.py``, through ``limiter_lua``) and the exporter's gauges
(``worker/exporter.py``, through ``bucket_level``), so the two cannot drift apart.

Key families:

    P:limit:rpm, P:limit:tpm   hash {tokens, ts}: a bucket's level at ``ts`` (Redis ms); expires
                               ``BUCKET_TTL_MS`` after its last grant (a missing bucket is full).
    P:limit:inflight           zset lease id -> expiry ms.
    P:limit:cooldown           string: until when (ms) every caller holds back after an upstream 429.
    P:limit:waiters            zset process -> rank (the fleet-wide waiting line).
    P:limit:alive              zset process -> expiry ms of its place in that line.
    P:limit:wake               pub/sub channel: capacity may have changed.

Times are Redis' own clock (``TIME``), so node clocks may differ. Why buckets refill over 62 s
rather than 60 is the design note in ``worker/ratelimit.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from string import Template

# A bucket refills (limit - burst) over this period; the 2 s beyond the minute cover the delay from
# grant to the upstream counting the request (worker/ratelimit.py).
REFILL_PERIOD_MS = 62_000
# A bucket hash expires this long after its last grant, and a missing bucket reads as full: one whose
# burst is under half its limit (the defaults, bar tiny limits) has refilled to full well before then.
BUCKET_TTL_MS = 120_000
# A bucket hash's fields, in the order ``bucket_level`` reads them from ``HMGET``.
BUCKET_FIELDS = ("tokens", "ts")


@dataclass(frozen=True)
class LimiterKeys:
    """The limiter's key and channel names under one prefix."""

    rpm: str
    tpm: str
    inflight: str
    cooldown: str
    waiters: str
    alive: str
    wake: str

    @classmethod
    def for_prefix(cls, prefix: str) -> LimiterKeys:
        p = f"{prefix}:limit"
        return cls(
            rpm=f"{p}:rpm",
            tpm=f"{p}:tpm",
            inflight=f"{p}:inflight",
            cooldown=f"{p}:cooldown",
            waiters=f"{p}:waiters",
            alive=f"{p}:alive",
            wake=f"{p}:wake",
        )


def refill_per_ms(limit: int, burst: int) -> float:
    """Tokens a bucket gains per ms: ``(limit - burst)`` over the refill period, at least 1 per period.

    A limit no larger than its burst (e.g. 1 RPM) still refills; its ceiling is then burst + limit.
    """
    return max(limit - burst, 1) / REFILL_PERIOD_MS


def bucket_level(stored: Sequence[bytes | str | float | None], now_ms: float, limit: int, burst: int) -> float:
    """A bucket's tokens at ``now_ms``, from its stored ``(tokens, ts)`` as ``HMGET key tokens ts`` gives them.

    A missing bucket (tokens None) is full: ``burst``. Otherwise the stored tokens plus the refill
    since ``ts``, capped at ``burst``; the result is negative while the bucket is in debt (a TPM
    reservation larger than the bucket, or usage above the estimate). Same arithmetic as
    ``BUCKET_LEVEL_LUA``.
    """
    tokens, ts_ms = stored[0], stored[1]
    if tokens is None:
        return float(burst)
    if ts_ms is None:
        raise ValueError("a stored bucket has tokens but no ts")
    return min(float(burst), float(tokens) + (now_ms - float(ts_ms)) * refill_per_ms(limit, burst))


# The Lua twin of refill_per_ms and bucket_level, for the limiter's scripts: the level of the bucket at
# `key` at `now` (nil when no bucket is stored) and its refill rate per ms.
BUCKET_LEVEL_LUA = """
local function bucket_level(key, limit, burst, now)
  local rate = math.max(limit - burst, 1) / $refill_period_ms
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(state[1])
  if tokens ~= nil then
    tokens = math.min(burst, tokens + (now - tonumber(state[2])) * rate)
  end
  return tokens, rate
end
"""

_CONSTANTS = {"refill_period_ms": str(REFILL_PERIOD_MS), "bucket_ttl_ms": str(BUCKET_TTL_MS)}
_LUA_NAMES = {**_CONSTANTS, "bucket_level": Template(BUCKET_LEVEL_LUA.strip()).substitute(_CONSTANTS)}


def limiter_lua(script: str) -> str:
    """``script`` with ``$refill_period_ms``, ``$bucket_ttl_ms`` and ``$bucket_level`` filled in.

    ``$bucket_level`` defines the Lua function ``bucket_level(key, limit, burst, now)``. Lua's own
    braces are untouched (``string.Template`` only reads ``$``).

    Raises:
        KeyError: the script names any other placeholder.
    """
    return Template(script).substitute(_LUA_NAMES)
