"""The limiter's Lua scripts (see ``worker/ratelimit.py`` for the design, ``worker/limiter_state.py`` for the keys).

Each script's text is ``limiter_lua``'s: ``$window_functions`` (the Lua functions ``window_check``,
``window_add`` and ``window_refund``) and the constants they use are filled in once, at import, from
``worker/limiter_state.py``.
"""

from worker.limiter_state import limiter_lua

# KEYS: 1 waiters zset, 2 alive zset, 3 vtime hash, 4 vclock, 5 weights hash, 6 parked zset, then every
#       key the spec names by its index (all of them under P:{limit}:, declared: one slot holds them).
# ARGV: 1 the spec, JSON (``Limiter._spec``):
#   me (``<process>|<tenant>``), tenant, weight, ttl (the waiter's place, ms), lease_ttl (ms), window (ms),
#   wake (channel), unit (VTIME_UNIT), pinned (true: the tenant may use only some accounts),
#   batch: the process's best waiters of the tenant, best first, each [lease id, tokens, rank, next] (rank
#   and next as strings; next: the rank of the waiter after it, '' for none),
#   fleet and tenant: a scope {inflight = [key, cap] or absent, windows = [[grants key, units key, limit,
#   units, axis], ...] (a tpm window's units are each waiter's tokens)}, accounts: [{name, cooldown = key,
#   out = key, and a scope's fields}, ...].
# Grants the batch's waiters in order, each as if it had asked alone (the fair-share head is found again
# after every grant), and stops at the first that cannot go.
# Returns {granted count, wait ms of the first not granted (-1 = until woken; 0 when all went), reason,
# the fleet's head (when queued behind another process) or '', then each granted waiter's account}.
ACQUIRE_LUA = limiter_lua("""
$window_functions
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local spec = cjson.decode(ARGV[1])
local me, tenant, batch = spec.me, spec.tenant, spec.batch

local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, w in ipairs(stale) do
  redis.call('ZREM', KEYS[1], w)
  redis.call('ZREM', KEYS[2], w)
end
redis.call('ZADD', KEYS[1], batch[1][3], me)  -- a string: a Lua number would lose digits
redis.call('ZADD', KEYS[2], now + spec.ttl, me)
redis.call('HSET', KEYS[5], tenant, spec.weight)
redis.call('PEXPIRE', KEYS[5], $vtime_ttl_ms)

-- Fair share (start-time fair queueing): the line's head is the waiting tenant whose next grant starts
-- earliest in virtual time, max(its last finish, the clock), then the best rank within it. A parked
-- tenant (held back by its own limits or its pinned accounts) is out of the line until its time.
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now)
local parked, next_unpark = {}, nil
local p = redis.call('ZRANGE', KEYS[6], 0, -1, 'WITHSCORES')
for i = 1, #p, 2 do
  parked[p[i]] = tonumber(p[i + 1])
  if next_unpark == nil or parked[p[i]] < next_unpark then next_unpark = parked[p[i]] end
end
if parked[tenant] then
  return {0, parked[tenant] - now, 'parked', ''}
end

local function line_head()
  local vclock = tonumber(redis.call('GET', KEYS[4]) or '0')
  local line = redis.call('ZRANGE', KEYS[1], 0, -1)
  local seen, head, head_start = {}, nil, nil
  for _, m in ipairs(line) do
    local tm = string.match(m, '^[^|]*|(.*)')  -- process ids hold no '|'
    if tm and not seen[tm] and not parked[tm] then
      seen[tm] = true
      local start = math.max(tonumber(redis.call('HGET', KEYS[3], tm) or '0'), vclock)
      if head == nil or start < head_start then head, head_start = m, start end
    end
  end
  return head, head_start
end

-- One call's units on a window: 1 request, or its tokens.
local function units(w, tokens)
  if w[5] == 'tpm' then return tokens end
  return w[4]
end

-- A scope's room for a call of ``tokens``: {wait ms (0: room now), reason, headroom (the least fraction
-- left on any axis)}.
local function scope_room(sc, prefix, tokens)
  local wait, reason, room = 0, 'ok', 1
  if sc.inflight then
    local key, cap = KEYS[sc.inflight[1]], sc.inflight[2]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local n = redis.call('ZCARD', key)
    if n >= cap then
      local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      wait, reason = math.max(1, tonumber(first[2]) - now), prefix .. 'inflight'
    else
      room = math.min(room, (cap - n - 1) / cap)
    end
  end
  for _, w in ipairs(sc.windows or {}) do
    local need = units(w, tokens)
    local used, ww = window_check(KEYS[w[1]], KEYS[w[2]], now, spec.window, w[3], need)
    if ww > wait then
      wait, reason = ww, prefix .. w[5]
    elseif ww == 0 then
      room = math.min(room, (w[3] - used - need) / w[3])
    end
  end
  return wait, reason, room
end

local function park(wait, reason)
  redis.call('ZADD', KEYS[6], now + wait, tenant)
  redis.call('PEXPIRE', KEYS[6], wait + 1000)
  redis.call('PUBLISH', spec.wake, 'park')  -- the next tenant in line may go now
  return wait, reason
end

local function take(sc, lease, tokens)
  for _, w in ipairs(sc.windows or {}) do
    window_add(KEYS[w[1]], KEYS[w[2]], now, spec.window, lease, units(w, tokens))
  end
  if sc.inflight then
    redis.call('ZADD', KEYS[sc.inflight[1]], now + spec.lease_ttl, lease)
  end
end

-- One waiter: its account when granted, else nil and how long to wait and why (and the fleet's head).
local function grant(lease, tokens, nxt)
  local head, head_start = line_head()
  if head ~= me then
    -- Ask again when the next parked tenant comes back (it may be the head then), or when woken.
    return nil, next_unpark and (next_unpark - now) or -1, 'queued', head or ''
  end
  -- The fleet's cap holds everyone back: the head waits at the front.
  if spec.fleet then
    local wait, reason = scope_room(spec.fleet, '', tokens)
    if wait > 0 then return nil, wait, reason, '' end
  end
  -- A tenant held back by its own limits leaves the line until it has room.
  if spec.tenant_scope then
    local wait, reason = scope_room(spec.tenant_scope, 'tenant_', tokens)
    if wait > 0 then
      local w, r = park(wait, reason)
      return nil, w, r, ''
    end
  end
  -- The account with the most headroom among those free now (ties: the file's order).
  local chosen, best_room, min_wait, min_reason = nil, -1, nil, 'ok'
  for _, a in ipairs(spec.accounts) do
    local wait, reason, room = 0, 'ok', 1
    local out = tonumber(redis.call('GET', KEYS[a.out]) or '0')
    local cool = tonumber(redis.call('GET', KEYS[a.cooldown]) or '0')
    if out > now then
      wait, reason = out - now, 'out_of_rotation'
    elseif cool > now then
      wait, reason = cool - now, 'cooldown'
    else
      wait, reason, room = scope_room(a, '', tokens)
    end
    if wait == 0 then
      if room > best_room then chosen, best_room = a, room end
    elseif min_wait == nil or wait < min_wait then
      min_wait, min_reason = wait, reason
    end
  end
  if chosen == nil then
    -- Every account this tenant may use is busy: if those are all the fleet's, the head waits at the
    -- front (nobody else could go either, and the head is not starved by smaller calls); if it is
    -- pinned to some, it leaves the line so tenants that may use the others go meanwhile.
    if spec.pinned then
      local w, r = park(min_wait, min_reason)
      return nil, w, r, ''
    end
    return nil, min_wait, min_reason, ''
  end
  if spec.fleet then take(spec.fleet, lease, tokens) end
  if spec.tenant_scope then take(spec.tenant_scope, lease, tokens) end
  take(chosen, lease, tokens)
  redis.call('SET', KEYS[4], string.format('%d', head_start), 'PX', $vtime_ttl_ms)
  redis.call('HSET', KEYS[3], tenant, string.format('%d', head_start + math.floor(spec.unit / spec.weight)))
  redis.call('PEXPIRE', KEYS[3], $vtime_ttl_ms)
  -- The process's next waiter of this tenant keeps its place (a tenant out of the line between two
  -- grants would not be weighed against the others); with none, it leaves.
  if nxt ~= '' then
    redis.call('ZADD', KEYS[1], nxt, me)
  else
    redis.call('ZREM', KEYS[1], me)
    redis.call('ZREM', KEYS[2], me)
  end
  return chosen.name
end

local out = {0, 0, 'ok', ''}
for _, item in ipairs(batch) do
  local account, wait, reason, head = grant(item[1], item[2], item[4])
  if account == nil then
    out[2], out[3], out[4] = wait, reason, head
    break
  end
  out[1] = out[1] + 1
  out[#out + 1] = account
end
if out[1] > 0 and redis.call('ZCARD', KEYS[1]) > 0 then
  redis.call('PUBLISH', spec.wake, 'grant')  -- the next in line may go now
end
return out
""")

# KEYS: 1 parked zset, 2.. the in-flight zsets and then the token units hashes the grant was entered in.
# ARGV: 1 lease id, 2 refund tokens, 3 wake channel, 4 how many of the keys after the first are in-flight
# zsets. Gives the lease back and lowers the grant's units in each token window by the refund (a
# negative refund, usage above the estimate, raises them), so the window holds what the call used; a
# grant that has already left a window gets nothing there. Parked tenants come back to the line: a
# freed slot may be the one they wait for (those still held back park again at their next ask).
RELEASE_LUA = limiter_lua("""
$window_functions
local slots = tonumber(ARGV[4])
for i = 2, 1 + slots do
  redis.call('ZREM', KEYS[i], ARGV[1])
end
local refund = tonumber(ARGV[2])
if refund ~= 0 then
  for i = 2 + slots, #KEYS do
    window_refund(KEYS[i], ARGV[1], refund)
  end
end
redis.call('DEL', KEYS[1])
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

# KEYS: 1 waiters zset, 2 alive zset, 3.. in-flight zsets. ARGV: 1 lease ttl ms, 2 waiter ttl ms, 3 how
# many line members follow, then the members (``<process>|<tenant>``), then pairs (lease id, index of
# its in-flight zset in KEYS). Renews this process's places in line and its leases. The caller sends
# only leases whose calls are still in flight, and a lease is added back if it is gone: one whose
# renewals were late by more than its TTL (Redis paused, the loop stalled) was swept by the next
# acquire while its call went on, and must count against the cap again.
RENEW_LUA = limiter_lua("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local members = tonumber(ARGV[3])
for i = 4, 3 + members do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[i])
  end
end
for i = 4 + members, #ARGV, 2 do
  redis.call('ZADD', KEYS[tonumber(ARGV[i + 1])], now + tonumber(ARGV[1]), ARGV[i])
end
return 1
""")

# KEYS: 1 waiters zset, 2 alive zset. ARGV: 1 member (``<process>|<tenant>``), 2 wake channel. A process
# with no more waiters of a tenant leaves the line, so it cannot block the fleet's head position.
LEAVE_LUA = limiter_lua("""
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('PUBLISH', ARGV[2], 'leave')
end
return 1
""")
