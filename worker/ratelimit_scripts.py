"""The limiter's Lua scripts (see ``worker/ratelimit.py`` for the design, ``worker/limiter_state.py`` for the keys).

Each script's text is ``limiter_lua``'s: ``$window_functions`` (the Lua functions ``window_check``,
``window_add`` and ``window_refund``) and the constants they use are filled in once, at import, from
``worker/limiter_state.py``.
"""

from worker.limiter_state import limiter_lua

# KEYS: 1 inflight zset, 2 cooldown, 3 waiters zset, 4 alive zset, then two per rate window: its
#       grants zset and its units hash (5, 6 for the first window, 7, 8 for the second, ...).
# ARGV: 1 waiter id, 2 rank, 3 waiter ttl ms, 4 lease id, 5 lease ttl ms, 6 max in flight (0 = none),
#       7 wake channel, 8 window ms, then three per rate window, in the order of its keys: its name
#       (rpm, tpm: the reason a caller waits), its limit, and the units this call takes from it.
# A scope's limits (issue 13) are more windows: the grant goes only if every window has room.
# Returns {granted (1|0), wait ms (-1 = until woken), reason}.
ACQUIRE_LUA = limiter_lua("""
$window_functions
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]

local stale = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
for _, w in ipairs(stale) do
  redis.call('ZREM', KEYS[3], w)
  redis.call('ZREM', KEYS[4], w)
end
redis.call('ZADD', KEYS[3], tonumber(ARGV[2]), me)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[3]), me)
if redis.call('ZRANGE', KEYS[3], 0, 0)[1] ~= me then
  return {0, -1, 'queued'}
end

local cool = tonumber(redis.call('GET', KEYS[2]) or '0')
if cool > now then
  return {0, cool - now, 'cooldown'}
end

local max_inflight = tonumber(ARGV[6])
if max_inflight > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= max_inflight then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, math.max(1, tonumber(first[2]) - now), 'inflight'}
  end
end

-- Every window is trimmed and asked; the call waits for the one that frees up last.
local window_ms = tonumber(ARGV[8])
local windows = (#KEYS - 4) / 2
local wait, reason = 0, 'ok'
for i = 1, windows do
  local a = 6 + 3 * i
  local limit, need = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local _, w = window_check(KEYS[3 + 2 * i], KEYS[4 + 2 * i], now, window_ms, limit, need)
  if w > wait then wait, reason = w, ARGV[a] end
end
if wait > 0 then
  return {0, wait, reason}
end

for i = 1, windows do
  window_add(KEYS[3 + 2 * i], KEYS[4 + 2 * i], now, window_ms, ARGV[4], tonumber(ARGV[8 + 3 * i]))
end
if max_inflight > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), ARGV[4])
end
redis.call('ZREM', KEYS[3], me)
redis.call('ZREM', KEYS[4], me)
if redis.call('ZCARD', KEYS[3]) > 0 then
  redis.call('PUBLISH', ARGV[7], 'grant')  -- the next in line may go now
end
return {1, 0, 'ok'}
""")

# KEYS: 1 inflight zset, 2.. the units hashes of the token windows the grant was entered in.
# ARGV: 1 lease id, 2 refund tokens, 3 wake channel. Gives the lease back and lowers the grant's units
# in each window by the refund (a negative refund, usage above the estimate, raises them), so the
# window holds what the call used; a grant that has already left a window gets nothing there.
RELEASE_LUA = limiter_lua("""
$window_functions
redis.call('ZREM', KEYS[1], ARGV[1])
local refund = tonumber(ARGV[2])
if refund ~= 0 then
  for i = 2, #KEYS do
    window_refund(KEYS[i], ARGV[1], refund)
  end
end
redis.call('PUBLISH', ARGV[3], 'release')
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
