"""The deliveries' state in Redis: what the nodes, the console and the exporter share about it.

A job that ends with a webhook or a Celery callback in its record owes a delivery. The write that
ends it adds one entry per delivery to its group's stream ``P:deliveries:{g}`` (moonq/eventlog.py,
moonq/keys.py); from there (every key below in the job's group):

    P:deliveries:{g} (stream)  --the nodes' consumer group "nodes" reads it (worker/deliveries.py)-->
        delivered                      -> entry acknowledged and deleted
        failed, may be retried         -> state in P:delivery:{g}:<id>, id in P:deliveries:due:{g}; when
                                          due, ``PROMOTE_LUA`` moves it back into the stream
        failed for good                -> id in P:deliveries:dead:{g} (``moonq webhooks failed``);
                                          ``REDELIVER_LUA`` puts it back into the stream by hand

An entry is acknowledged only in the same MULTI that records its outcome, so a node that dies
mid-delivery leaves it pending, and another node claims it after ``webhook_claim_idle_s``: at
least once. The keys are named in moonq/keys.py; delivery ids in moonq/webhooks.py.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from moonq.indexes import newest_first
from moonq.keys import GROUPS, Keys, group_of
from moonq.record import DEFAULT_TENANT, JobField, decode_hash
from moonq.webhooks import delivery_id, parse_delivery_id

GROUP = "nodes"  # the consumer group every node reads the stream through

# A stream entry's fields: ``kind`` and ``job`` (the hand-off, moonq/eventlog.py); for a progress event
# also ``event`` (started | retry), and ``attempt`` (started) or ``seq`` and the event ``e`` (retry);
# ``again`` = "1" and the delivery's ``id`` on an entry put back by ``PROMOTE_LUA`` or
# ``REDELIVER_LUA``: only those have a P:delivery:<id> to read.
AGAIN, ID, EVENT, SEQ, EVENT_JSON, ATTEMPT = "again", "id", "event", "seq", "e", "attempt"
# Fields of P:delivery:<id>.
KIND, JOB, TARGET, QUEUE, BODY, EVENT_AT = "kind", "job", "target", "queue", "body", "event_at"
TENANT = "tenant"  # whose webhook_secrets sign it (the secrets themselves are never stored)
ATTEMPTS, FIRST_AT, LAST_ERROR, NEXT_AT, GAVE_UP_AT = "attempts", "first_at", "last_error", "next_at", "gave_up_at"

# Retries that are due go back into the stream, atomically (a delivery is in exactly one of the two).
# KEYS: pairs of a group's due zset and its stream (every group in one call on one Redis; one group per
# call on a Redis Cluster, where a script works in one slot). ARGV[1] now (unix s), ARGV[2] most to move
# per group. Returns how many moved.
PROMOTE_LUA = """
local moved = 0
for k = 1, #KEYS, 2 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[k], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
  for _, id in ipairs(due) do
    redis.call('ZREM', KEYS[k], id)
    local kind, job = string.match(id, '^(%a+):([^:]+)')
    if kind then redis.call('XADD', KEYS[k + 1], '*', 'kind', kind, 'job', job, 'again', '1', 'id', id) end
  end
  moved = moved + #due
end
return moved
"""

# A dead delivery back into the stream, its attempts and retry horizon started afresh.
# KEYS[1] dead zset, KEYS[2] stream, KEYS[3] the delivery's hash. ARGV[1] delivery id, ARGV[2] kind,
# ARGV[3] job id, ARGV[4] the hash's TTL (s). Returns 1, or 0 when it is not (any more) a dead letter.
REDELIVER_LUA = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'attempts', '0')
  redis.call('HDEL', KEYS[3], 'first_at', 'gave_up_at', 'next_at')
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4]))
end
redis.call('XADD', KEYS[2], '*', 'kind', ARGV[2], 'job', ARGV[3], 'again', '1', 'id', ARGV[1])
return 1
"""


def entry_delivery_id(entry: dict[str, str]) -> str:
    """The delivery id of a stream entry: the one it carries, or the one its fields make."""
    return entry.get(ID) or delivery_id(
        entry.get(KIND, ""), entry.get(JOB, ""), entry.get(EVENT, ""), entry.get(SEQ, "")
    )


def shown_target(target: str) -> str:
    """A URL for screens and logs: without its query or fragment (they may carry a token)."""
    parts = urlsplit(target)
    if not parts.scheme:
        return target  # a Celery task name
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "…" if parts.query else "", ""))


def failed_deliveries(r: redis.Redis, keys: Keys, limit: int, tenant: str | None = None) -> list[dict[str, Any]]:
    """The newest dead deliveries first: ``[{id, kind, job_id, tenant, target, attempts, gave_up_at, error}]``;
    ``tenant``: that tenant's only (the state names it; else its job's record, while it lasts)."""
    window = limit if tenant is None else max(limit, 1000)  # a tenant's among everyone's: look further
    entries = newest_first(r, [keys.deliveries_dead_in(g) for g in GROUPS], window)
    if not entries:
        return []
    with r.pipeline(transaction=False) as pipe:
        for delivery, _ in entries:
            job_id = parse_delivery_id(delivery)[1]
            pipe.hgetall(keys.delivery(delivery, job_id))
            pipe.hget(keys.job(job_id), JobField.TENANT)
        replies = pipe.execute()
    rows: list[dict[str, Any]] = []
    for (delivery, gave_up_at), raw, job_tenant in zip(entries, replies[::2], replies[1::2], strict=True):
        state = decode_hash(raw)
        owner = state.get(TENANT) or (job_tenant.decode() if job_tenant else DEFAULT_TENANT)
        if tenant is not None and owner != tenant:
            continue
        if len(rows) == limit:
            break
        kind, job_id = parse_delivery_id(delivery)
        rows.append(
            {
                "id": delivery,
                "kind": kind,
                "job_id": job_id,
                "tenant": owner,
                "target": shown_target(state.get(TARGET, "")) or None,
                "attempts": int(state.get(ATTEMPTS) or 0),
                "gave_up_at": gave_up_at,
                "error": state.get(LAST_ERROR) or None,
            }
        )
    return rows


def delivery_tenant(r: redis.Redis, keys: Keys, delivery: str) -> str:
    """The tenant a delivery belongs to: as its stored state names it, else its job's record.

    Raises:
        ValueError: ``delivery`` is not a delivery id.
    """
    _, job_id = parse_delivery_id(delivery)
    with r.pipeline(transaction=False) as pipe:
        pipe.hget(keys.delivery(delivery, job_id), TENANT)
        pipe.hget(keys.job(job_id), JobField.TENANT)
        named, recorded = pipe.execute()
    found = named or recorded
    return found.decode() if found else DEFAULT_TENANT


def redeliver(r: redis.Redis, keys: Keys, delivery: str, *, ttl_s: int) -> bool:
    """Put a dead delivery back into the stream (``moonq webhooks redeliver``); False if it is no dead letter.

    The receiver gets the same ``webhook-id`` (and, if a body was stored, the same body) as before.

    Raises:
        ValueError: ``delivery`` is not a delivery id.
    """
    kind, job_id = parse_delivery_id(delivery)
    group = group_of(job_id)
    keys_ = [keys.deliveries_dead_in(group), keys.deliveries_in(group), keys.delivery(delivery, job_id)]
    return bool(r.eval(REDELIVER_LUA, len(keys_), *keys_, delivery, kind, job_id, ttl_s))


def backlog(r: redis.Redis, keys: Keys) -> dict[str, int]:
    """Deliveries by state: ``queued`` (in the stream, waiting or being attempted), ``retrying``, ``dead``."""
    with r.pipeline(transaction=False) as pipe:
        for group in GROUPS:
            pipe.xlen(keys.deliveries_in(group))
            pipe.zcard(keys.deliveries_due_in(group))
            pipe.zcard(keys.deliveries_dead_in(group))
        replies = pipe.execute()
    return {
        "queued": sum(int(n) for n in replies[0::3]),
        "retrying": sum(int(n) for n in replies[1::3]),
        "dead": sum(int(n) for n in replies[2::3]),
    }
