"""A job's event log: one atomic append to the replay log, the live channel and the job record.

Writers (the worker, and a producer cancelling a queued job) go through ``APPEND_LUA``, so
sequence numbers, the replay log, the live channel and the job record never disagree.
Readers (producers/follow.py) subscribe first, then replay the log, then follow the channel,
filling any gap from the log: pub/sub alone is at-most-once, the log makes it exactly-once for
the reader. The log
keeps a job's newest ``max_events_per_job`` entries: a reader who falls further behind than
that (or arrives that late) goes on from the oldest entry kept, and never waits for one trimmed.
"""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import redis

from moonq.keys import Keys
from moonq.record import record_lua
from moonq.redisurl import is_cluster_client
from moonq.wire import Event

# A job's last write by its node (completed, failed) is refused once a cancel was asked for: the cancel's
# announcement may not have reached the node (its link to Redis was down), and promise 5 of
# docs/guarantees.md says the job then ends cancelled. Not a status name, so no record's status matches it.
UNLESS_CANCELLED = "!unless_cancelled"

# Field and status names come from moonq/record.py (``$status``, ``$seq``, ``$owner``, ``$is_terminal``).
# KEYS[1] job hash, KEYS[2] log stream, KEYS[3] active-jobs index, KEYS[4] (optional) the deliveries
# stream, KEYS[5] (optional) the job's idempotency key. (No empty key name is ever passed: a Redis ACL
# that confines a user to the prefix's keys refuses it.)
# ARGV[1] channel, ARGV[2] ttl_s, ARGV[3] owner token ('' = any), ARGV[4] required status ('' = any
# that is not terminal; UNLESS_CANCELLED = any that is not terminal, and no cancel asked for), ARGV[5]
# expected seq before this write ('' = don't check), ARGV[6] most entries
# the log keeps (0 = no cap), ARGV[7] job id, ARGV[8] n = number of events, ARGV[9 .. 8+n] event
# bodies: JSON objects without "seq" (the script assigns it), then field/value pairs to set on the job hash.
# The cap trims the oldest entries (exact MAXLEN): the newest, and so the terminal event, always stays;
# the sequence numbers and the job record are untouched, so readers see a log that starts later.
# A write that leaves the job in a terminal status ends it: the record, its log and its idempotency
# key get their TTL, and the job leaves the active index. Before that nothing here expires: an active
# job's keys are owned by the index (moonq/keys.py), so a long queue or a long job never loses them.
# The same write hands off what the job's ending owes: with KEYS[4], one entry (kind, job) per webhook
# or Celery callback the record names is added to the deliveries stream, in the same atomic step, so a
# node killed right after the job ended still has them delivered (worker/deliveries.py). Likewise a
# ``retry`` event, when the record's ``webhook_events`` subscribes to it: its entry carries the event.
# Returns the last seq written, or 0 when nothing was written because the job is missing (expired),
# already ended, owned by someone else, not in the required status, or (UNLESS_CANCELLED) asked to
# cancel. A writer that retries a call whose reply was lost finds the seq already advanced by exactly its
# n events and gets success without a second copy: writes are idempotent for the owner.
APPEND_LUA = record_lua(
    """
local state = redis.call('HMGET', KEYS[1], $status, $seq, $owner, $cancel_requested)
local status, owner = state[1], state[3]
if not status then return 0 end
local n = tonumber(ARGV[8])
local seq = tonumber(state[2] or '0')
if ARGV[5] ~= '' and seq == tonumber(ARGV[5]) + n and n > 0 and (ARGV[3] == '' or owner == ARGV[3]) then
  return seq
end
if $is_terminal then return 0 end
if ARGV[4] == '$unless_cancelled' then
  if state[4] == '1' then return 0 end
elseif ARGV[4] ~= '' and status ~= ARGV[4] then return 0 end
if ARGV[3] ~= '' and owner ~= ARGV[3] then return 0 end
if ARGV[5] ~= '' and seq ~= tonumber(ARGV[5]) then return 0 end
local subscribed = nil
for i = 1, n do
  seq = seq + 1
  local body = ARGV[8 + i]
  local msg = '{"seq":' .. seq .. ',' .. string.sub(body, 2)
  redis.call('XADD', KEYS[2], seq .. '-0', 'e', msg)
  redis.call('PUBLISH', ARGV[1], msg)
  if KEYS[4] and string.match(body, '^{"job_id":"[^"]*","type":"retry"') then
    subscribed = subscribed or (',' .. (redis.call('HGET', KEYS[1], $webhook_events) or '') .. ',')
    if string.find(subscribed, ',retry,', 1, true) then
      redis.call('XADD', KEYS[4], '*', 'kind', 'webhook', 'job', ARGV[7], 'event', 'retry', 'seq', seq, 'e', msg)
    end
  end
end
redis.call('HSET', KEYS[1], $seq, seq)
-- The log holds at most seq entries (seq 1 .. seq, less those trimmed): under the cap, nothing to trim.
local cap = tonumber(ARGV[6])
if n > 0 and cap > 0 and seq > cap then redis.call('XTRIM', KEYS[2], 'MAXLEN', cap) end
-- Only the fields written here can change the status (a relayed delta writes none).
if #ARGV < 9 + n then return math.max(seq, 1) end
for i = 9 + n, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
status = redis.call('HGET', KEYS[1], $status)
if $is_terminal then
  local ttl = tonumber(ARGV[2])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  if KEYS[5] then redis.call('EXPIRE', KEYS[5], ttl) end
  redis.call('ZREM', KEYS[3], ARGV[7])
  if KEYS[4] then
    local owed = redis.call('HMGET', KEYS[1], $webhook, $on_done)
    if owed[1] and owed[1] ~= '' then redis.call('XADD', KEYS[4], '*', 'kind', 'webhook', 'job', ARGV[7]) end
    if owed[2] and owed[2] ~= '' then redis.call('XADD', KEYS[4], '*', 'kind', 'callback', 'job', ARGV[7]) end
  end
end
return math.max(seq, 1)
""".replace("$unless_cancelled", UNLESS_CANCELLED)
)


# On a Redis Cluster the channel is a shard channel: a fragment goes to the one shard that holds its job
# (and its subscribers), not to every node as a plain PUBLISH would. Readers subscribe with SSUBSCRIBE there
# (producers/fanout.py).
SHARDED_APPEND_LUA = APPEND_LUA.replace("redis.call('PUBLISH', ARGV[1], msg)", "redis.call('SPUBLISH', ARGV[1], msg)")
assert SHARDED_APPEND_LUA != APPEND_LUA


def append_lua(client: object) -> str:
    """The event-append script for ``client``: ``SHARDED_APPEND_LUA`` on a Redis Cluster, else ``APPEND_LUA``."""
    return SHARDED_APPEND_LUA if is_cluster_client(client) else APPEND_LUA


def event_body(job_id: str, type: str, **fields: Any) -> str:
    """An event as JSON without ``seq`` (``APPEND_LUA`` adds it); None-valued fields are left out.

    Raises:
        TypeError: a field that ``Event`` does not define (readers would drop it silently).
    """
    unknown = fields.keys() - Event.model_fields.keys()
    if unknown:
        raise TypeError(f"Event has no field(s) {sorted(unknown)}")
    data = Event(job_id=job_id, seq=0, type=type, **fields).model_dump(mode="json", exclude_none=True)
    del data["seq"]
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def delta_body(job_id: str, attempt: int, index: int, delta: dict[str, Any]) -> str:
    """``event_body(job_id, "delta", ...)`` for the hot path: the same JSON, built without a model.

    A stream sends a delta per chunk, thousands a second per node; pydantic's build-and-dump
    costs several times plain ``json.dumps`` here, and a delta's fields need no checking.
    """
    data = {"job_id": job_id, "type": "delta", "ts": time.time(), "attempt": attempt, "index": index, "delta": delta}
    # orjson writes what json.dumps(separators=(",", ":"), ensure_ascii=False) writes, several times
    # faster; what it refuses (an integer past 64 bits, read by json from a chunk) goes through json.
    try:
        return orjson.dumps(data).decode()
    except orjson.JSONEncodeError:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def append_args(
    keys: Keys,
    job_id: str,
    bodies: list[str],
    *,
    ttl_s: int,
    owner: str = "",
    require_status: str = "",
    expected_seq: int | None = None,
    max_events: int = 0,
    fields: dict[str, str] | None = None,
    idempotency_key: str = "",
    job_keys: list[str] | None = None,
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV for ``APPEND_LUA``.

    Args:
        max_events: caps the log's length (0 = no cap).
        idempotency_key: the Redis key of the job's idempotency key, if it has one (the record's
            ``idem_key``), so that it expires with the job.
        job_keys: the job's four keys as an earlier call made them (a writer's per-event calls reuse them).

    The keys always end with the deliveries stream, so whichever writer ends a job hands off the
    webhook and callback its record names.
    """
    expected = "" if expected_seq is None else expected_seq
    argv: list[str | int] = [
        keys.events(job_id),
        ttl_s,
        owner,
        require_status,
        expected,
        max_events,
        job_id,
        len(bodies),
        *bodies,
    ]
    for name, value in (fields or {}).items():
        argv += [name, value]
    if job_keys is None:
        job_keys = [keys.job(job_id), keys.log(job_id), keys.active_for(job_id), keys.deliveries_for(job_id)]
    return [*job_keys, idempotency_key] if idempotency_key else job_keys, argv


def parse_entries(entries: list[tuple[Any, Any]]) -> list[Event]:
    return [Event.model_validate_json(fields[b"e"] if b"e" in fields else fields["e"]) for _, fields in entries]


def read_log(client: redis.Redis, keys: Keys, job_id: str, after_seq: int = 0) -> list[Event]:
    """Events of a job with seq > ``after_seq``, in order."""
    return parse_entries(client.xrange(keys.log(job_id), min=f"{after_seq + 1}-0", max="+") or [])
