"""The limiter's Lua scripts (see ``worker/ratelimit.py`` for the design, ``worker/limiter_state.py`` for the keys).

Each script's text is ``limiter_lua``'s: the ``$name`` placeholders (the refill period, the bucket
TTL, the ``bucket_level`` Lua function) are filled in once, at import, from ``worker/limiter_state.py``.
"""

from worker.limiter_state import limiter_lua

# KEYS: 1 rpm hash, 2 tpm hash, 3 inflight zset, 4 cooldown, 5 waiters zset, 6 alive zset.
# ARGV: 1 waiter id, 2 rank, 3 waiter ttl ms, 4 lease id, 5 lease ttl ms, 6 cost tokens,
#       7 rpm limit, 8 rpm burst, 9 tpm limit, 10 tpm burst, 11 max in flight (limits: 0 = none),
#       12 wake channel.
# Returns {granted (1|0), wait ms (-1 = until woken), reason}.
ACQUIRE_LUA = limiter_lua("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]

local stale = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now)
for _, w in ipairs(stale) do
  redis.call('ZREM', KEYS[5], w)
  redis.call('ZREM', KEYS[6], w)
end
redis.call('ZADD', KEYS[5], tonumber(ARGV[2]), me)
redis.call('ZADD', KEYS[6], now + tonumber(ARGV[3]), me)
if redis.call('ZRANGE', KEYS[5], 0, 0)[1] ~= me then
  return {0, -1, 'queued'}
end

local cool = tonumber(redis.call('GET', KEYS[4]) or '0')
if cool > now then
  return {0, cool - now, 'cooldown'}
end

local max_inflight = tonumber(ARGV[11])
if max_inflight > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= max_inflight then
    local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    return {0, math.max(1, tonumber(first[2]) - now), 'inflight'}
  end
end

$bucket_level
-- Refill a bucket to now (a missing one is full); returns tokens, rate per ms, burst.
local function refill(key, limit, burst)
  local tokens, rate = bucket_level(key, limit, burst, now)
  if tokens == nil then
    tokens = burst
  end
  return tokens, rate, burst
end

local wait, reason = 0, 'ok'
local rpm_limit, tpm_limit = tonumber(ARGV[7]), tonumber(ARGV[9])
local rpm_tokens, tpm_tokens
if rpm_limit > 0 then
  local tokens, rate = refill(KEYS[1], rpm_limit, tonumber(ARGV[8]))
  rpm_tokens = tokens
  if tokens < 1 then
    wait, reason = math.ceil((1 - tokens) / rate), 'rpm'
  end
end
local cost = tonumber(ARGV[6])
if tpm_limit > 0 then
  local tokens, rate, burst = refill(KEYS[2], tpm_limit, tonumber(ARGV[10]))
  tpm_tokens = tokens
  local need = math.min(cost, burst)
  if tokens < need then
    local w = math.ceil((need - tokens) / rate)
    if w > wait then wait, reason = w, 'tpm' end
  end
end
if wait > 0 then
  return {0, wait, reason}
end

if rpm_limit > 0 then
  redis.call('HSET', KEYS[1], 'tokens', rpm_tokens - 1, 'ts', now)
  redis.call('PEXPIRE', KEYS[1], $bucket_ttl_ms)
end
if tpm_limit > 0 then
  redis.call('HSET', KEYS[2], 'tokens', tpm_tokens - cost, 'ts', now)
  redis.call('PEXPIRE', KEYS[2], $bucket_ttl_ms)
end
if max_inflight > 0 then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[4])
end
redis.call('ZREM', KEYS[5], me)
redis.call('ZREM', KEYS[6], me)
if redis.call('ZCARD', KEYS[5]) > 0 then
  redis.call('PUBLISH', ARGV[12], 'grant')  -- the next in line may go now
end
return {1, 0, 'ok'}
""")

# KEYS: 1 tpm hash, 2 inflight zset. ARGV: 1 lease id, 2 refund tokens, 3 tpm limit, 4 tpm burst,
# 5 wake channel. Gives the lease back and returns unused tokens to the bucket (never above burst);
# a negative refund (the estimate was low) takes the difference.
RELEASE_LUA = limiter_lua("""
$bucket_level
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', KEYS[2], ARGV[1])
local refund, limit, burst = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if refund ~= 0 and limit > 0 then
  local tokens = bucket_level(KEYS[1], limit, burst, now)
  if tokens ~= nil then
    redis.call('HSET', KEYS[1], 'tokens', math.min(burst, tokens + refund), 'ts', now)
  end
end
redis.call('PUBLISH', ARGV[5], 'release')
return 1
""")

# KEYS: 1 cooldown. ARGV: 1 delay ms, 2 wake channel. Extends (never shortens) the shared cool-down.
COOLDOWN_LUA = limiter_lua("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local untilms = now + tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if untilms > cur then
  redis.call('SET', KEYS[1], untilms, 'PX', tonumber(ARGV[1]) + 1000)
end
return untilms
""")

# KEYS: 1 inflight zset, 2 waiters zset, 3 alive zset. ARGV: 1 lease ttl ms, 2 waiter id ('' = none),
# 3 waiter ttl ms, 4.. lease ids. Renews this process's leases and its waiter. The caller sends only
# leases whose calls are still in flight, and a lease is added back if it is gone: one whose renewals
# were late by more than its TTL (Redis paused, the loop stalled) was swept by the next acquire while
# its call went on, and must count against the cap again.
RENEW_LUA = limiter_lua("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 4, #ARGV do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
end
if ARGV[2] ~= '' and redis.call('ZSCORE', KEYS[2], ARGV[2]) then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[2])
end
return 1
""")

# KEYS: 1 waiters zset, 2 alive zset. ARGV: 1 waiter id, 2 wake channel. A process with no more waiters
# leaves the line, so it cannot block the fleet's head position.
LEAVE_LUA = limiter_lua("""
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('PUBLISH', ARGV[2], 'leave')
end
return 1
""")
