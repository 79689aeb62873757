"""The node's delivery worker: webhooks and Celery callbacks owed by ended jobs, at least once.

Runs on the node's asyncio loop beside the sweeper (started by worker/loop.py), never on a job's
path: its own Redis pool, its own HTTP client, at most ``webhook_concurrency`` deliveries at once.
The hand-off is a stream per group of jobs, ``P:deliveries:{g}`` (moonq/deliveries.py has the whole
picture):

- ``_read`` takes new entries through the consumer group ``nodes`` (XREADGROUP over every group's
  stream, blocking; on a Redis Cluster, where one command reads one slot, a poll every 0.2 s).
- ``_maintain`` moves due retries back into the stream, takes over the entries a dead node left
  pending for ``webhook_claim_idle_s`` (XAUTOCLAIM), and forgets consumers long gone.
- ``_handle`` makes one attempt and settles the entry with ``SETTLE_LUA``: acknowledged and deleted
  together with its outcome (delivered; a retry due later; a dead letter). Until then the entry is
  pending, so a node killed mid-attempt only delays it; a receiver may get the same ``webhook-id``
  twice and de-duplicates on it.

The first attempt builds the body from the job's record and keeps it in ``P:delivery:{g}:<id>`` if it
fails, so every retry sends the same body under the same id. Retries back off x4 from
``webhook_backoff_base_s`` (+-20%) up to ``webhook_backoff_max_s`` (or the receiver's Retry-After),
for ``webhook_retry_for_s`` after the first attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
import uuid
from typing import IO, Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from moonq.connect import resilient_redis
from moonq.deliveries import (
    AGAIN,
    ATTEMPT,
    ATTEMPTS,
    BODY,
    EVENT,
    EVENT_AT,
    EVENT_JSON,
    FIRST_AT,
    GAVE_UP_AT,
    GROUP,
    JOB,
    KIND,
    LAST_ERROR,
    NEXT_AT,
    PROMOTE_LUA,
    QUEUE,
    TARGET,
    TENANT,
    entry_delivery_id,
    shown_target,
)
from moonq.keys import GROUPS, group_of
from moonq.record import JobField, JobRecord, decode_hash
from moonq.redisurl import is_cluster_client
from moonq.tenants import cached_tenants
from moonq.webhooks import (
    CALLBACK,
    DEFAULT_CALLBACK_QUEUE,
    WEBHOOK,
    callback_args,
    progress_body,
    signed_headers,
    webhook_body,
)
from worker import metrics
from worker.callbacks import CallbackSender
from worker.settings import Settings
from worker.sink import ScriptSink
from worker.usage import cost_usd, load_prices, token_counts
from worker.webhook_http import Attempt, WebhookSender

log = logging.getLogger("moonq.worker")

# Settle one entry: acknowledged and deleted with its outcome, or nothing when another consumer
# settled it first (it was taken over while this one was slow). KEYS[1] stream, KEYS[2] the
# delivery's hash, KEYS[3] due zset, KEYS[4] dead zset. ARGV[1] entry id, ARGV[2] group, ARGV[3]
# outcome (delivered | retry | dead), ARGV[4] delivery id, ARGV[5] its score (due time, or when it
# gave up), ARGV[6] the hash's TTL (s), ARGV[7] dead letters older than this are trimmed, ARGV[8] the
# dead zset's TTL (s), ARGV[9..] field/value pairs for the hash. Returns 1 if settled here, else 0.
SETTLE_LUA = """
if redis.call('XACK', KEYS[1], ARGV[2], ARGV[1]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[1])
if ARGV[3] == 'delivered' then
  redis.call('DEL', KEYS[2])
  return 1
end
for i = 9, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[6]))
if ARGV[3] == 'retry' then
  redis.call('ZADD', KEYS[3], tonumber(ARGV[5]), ARGV[4])
else
  redis.call('ZADD', KEYS[4], tonumber(ARGV[5]), ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', tonumber(ARGV[7]))
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[8]))
end
return 1
"""

READ_BLOCK_MS = 1000
# On a Redis Cluster the streams are polled (module docstring): the pause after a poll found nothing.
CLUSTER_POLL_S = 0.2
# After a read smaller than the room left, wait this long before the next: later entries gather into one batch.
READ_LINGER_S = 0.02
RECORD_FIELDS = [f.value for f in JobField if f not in (JobField.ENVELOPE, JobField.OWNER, JobField.HEARTBEAT_AT)]
# The record without its envelope (the whole request), as one JSON object: a delivery reads only what
# the body says, and one string to parse costs the node a fraction of a 20-field HMGET reply. KEYS[1] job hash.
RECORD_JSON_LUA = (
    "local names = {"
    + ", ".join(f"'{name}'" for name in RECORD_FIELDS)
    + """}
local values = redis.call('HMGET', KEYS[1], unpack(names))
local found = {}
for i, name in ipairs(names) do
  if values[i] then found[name] = values[i] end
end
if next(found) == nil then return '{}' end
return cjson.encode(found)
"""
)
PROMOTE_BATCH = 500
# A consumer (a node process) with nothing pending and silent this long is removed from the group.
FORGET_CONSUMER_AFTER_MS = 3600 * 1000


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """The wait after failed attempt ``attempt`` (1-based): base x 4^(attempt-1), capped, +-20%."""
    wait_s: float = min(base_s * 4.0 ** min(attempt - 1, 30), max_s)
    return wait_s * random.uniform(0.8, 1.2)


class Tally:
    """The delivery metrics: applied at once on the node, or gathered in a delivery process and relayed.

    A delivery process (worker/delivery_process.py) has no ``/metrics`` of its own: it counts here and
    ``flush``-es one JSON line now and then to the node, which ``apply``-es it to the node's metrics.
    """

    def __init__(self, *, relay: bool = False) -> None:
        self.relay = relay
        self._deliveries: dict[tuple[str, str], int] = {}
        self._attempts: dict[tuple[str, str], int] = {}
        self._latencies: list[tuple[str, float]] = []

    def delivery(self, kind: str, outcome: str) -> None:
        if self.relay:
            self._deliveries[kind, outcome] = self._deliveries.get((kind, outcome), 0) + 1
        else:
            metrics.WEBHOOK_DELIVERIES.labels(kind, outcome).inc()

    def attempt(self, kind: str, result: str) -> None:
        if self.relay:
            self._attempts[kind, result] = self._attempts.get((kind, result), 0) + 1
        else:
            metrics.WEBHOOK_ATTEMPTS.labels(kind, result).inc()

    def latency(self, kind: str, seconds: float) -> None:
        if self.relay:
            self._latencies.append((kind, seconds))
        else:
            metrics.WEBHOOK_LATENCY.labels(kind).observe(seconds)

    def flush(self, out: IO[str]) -> None:
        """Write what was counted since the last flush as one JSON line (nothing if nothing was)."""
        if not (self._deliveries or self._attempts or self._latencies):
            return
        data = {
            "deliveries": [[k, o, n] for (k, o), n in self._deliveries.items()],
            "attempts": [[k, r, n] for (k, r), n in self._attempts.items()],
            "latencies": self._latencies,
        }
        self._deliveries, self._attempts, self._latencies = {}, {}, []
        out.write(json.dumps(data) + "\n")
        out.flush()

    @staticmethod
    def apply(data: dict[str, Any]) -> None:
        """Add a flushed line to this process's metrics (labels bounded again: the line crossed a pipe)."""
        for kind, outcome, n in data.get("deliveries", []):
            if outcome in metrics.DELIVERY_OUTCOMES:
                metrics.WEBHOOK_DELIVERIES.labels(_kind(kind), outcome).inc(int(n))
        for kind, result, n in data.get("attempts", []):
            metrics.WEBHOOK_ATTEMPTS.labels(_kind(kind), metrics.attempt_label(result)).inc(int(n))
        for kind, seconds in data.get("latencies", []):
            metrics.WEBHOOK_LATENCY.labels(_kind(kind)).observe(float(seconds))


class DeliveryWorker:
    """One node's delivery loops; ``run()`` until cancelled, then ``aclose()``."""

    def __init__(self, settings: Settings, tally: Tally | None = None) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.tally = tally or Tally()
        # Its own pool: a backlog of deliveries never queues in front of a job's writes.
        self.redis: Redis = resilient_redis(
            settings.redis_url, max_connections=settings.webhook_concurrency + 4, socket_keepalive=True
        )
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.secrets = settings.webhook_secrets
        self.tenants = cached_tenants(settings.tenants_file)
        self.http = WebhookSender(
            settings.webhook_allow_list,
            timeout_s=settings.webhook_timeout_s,
            max_connections=settings.webhook_concurrency,
        )
        self.callbacks = CallbackSender(settings.callback_broker_url or settings.broker_url)
        self.prices = load_prices(settings.prices_file)
        self._promote = self.redis.register_script(PROMOTE_LUA)
        self._record = self.redis.register_script(RECORD_JSON_LUA)
        self._settle = ScriptSink(self.redis, SETTLE_LUA)  # concurrent settles share round trips
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._streams = [self.keys.deliveries_in(g) for g in GROUPS]
        self._claim_cursors: dict[str, str] = {}
        self._cluster = is_cluster_client(self.redis)

    # ---- the loops ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await asyncio.gather(self._read(), self._maintain())
        finally:
            for task in self._tasks:
                task.cancel()  # left pending: another node (or this one, restarted) takes them over
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _ensure_group(self) -> None:
        for stream in self._streams:
            try:
                # From the stream's start: entries handed off before any node had the group are owed too.
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise

    async def _read_new(self, room: int) -> list[tuple[Any, list[tuple[Any, Any]]]]:
        """New entries of every group's stream: one blocking XREADGROUP over all of them on one Redis;
        on a Redis Cluster (where one command reads one slot) a pipelined non-blocking read of each,
        and a pause of ``CLUSTER_POLL_S`` when all were empty."""
        if not self._cluster:
            reply = await self.redis.xreadgroup(
                GROUP, self.consumer, dict.fromkeys(self._streams, ">"), count=room, block=READ_BLOCK_MS
            )
            return reply or []  # type: ignore[return-value]
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self._streams:
                pipe.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=room)
            replies = await pipe.execute()
        found = [item for reply in replies for item in reply or []]
        if not found:
            await asyncio.sleep(CLUSTER_POLL_S)
        return found

    async def _read(self) -> None:
        group_ready = False
        while True:
            try:
                if not group_ready:
                    await self._ensure_group()
                    group_ready = True
                room = await self._wait_for_room()
                started = 0
                for _, entries in await self._read_new(room):
                    started += await self._start(entries)
                if 0 < started < room:
                    await asyncio.sleep(READ_LINGER_S)  # let a few more gather: one pipeline for them all
            except asyncio.CancelledError:
                raise
            except ResponseError as err:
                group_ready = "NOGROUP" not in str(err)  # Redis lost the stream (restart without persistence)
                log.warning("event=deliveries_read_failed error=%r", err)
                await asyncio.sleep(1.0)
            except (RedisError, OSError):
                log.warning("event=deliveries_read_failed; retrying", exc_info=True)
                await asyncio.sleep(1.0)

    async def _maintain(self) -> None:
        s = self.settings
        tick_s = min(1.0, s.webhook_claim_idle_s / 4, s.webhook_backoff_base_s)
        next_claim = time.monotonic() + s.webhook_claim_idle_s / 2
        next_forget = time.monotonic()
        while True:
            await asyncio.sleep(tick_s)
            try:
                pairs = [[self.keys.deliveries_due_in(g), self.keys.deliveries_in(g)] for g in GROUPS]
                for keys in pairs if self._cluster else [[k for pair in pairs for k in pair]]:
                    await self._promote(keys=keys, args=[time.time(), PROMOTE_BATCH])
                now = time.monotonic()
                if now >= next_claim:
                    next_claim = now + s.webhook_claim_idle_s / 2
                    await self._take_over()
                if now >= next_forget:
                    next_forget = now + 600
                    await self._forget_consumers()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                log.warning("event=deliveries_maintenance_failed; retrying", exc_info=True)

    async def _take_over(self) -> None:
        """Entries pending with any consumer for ``webhook_claim_idle_s``: this node attempts them now."""
        room = self.settings.webhook_concurrency - len(self._tasks)
        if room <= 0:
            return
        idle_ms = int(self.settings.webhook_claim_idle_s * 1000)
        for stream in self._streams:
            reply = await self.redis.xautoclaim(
                stream, GROUP, self.consumer, idle_ms, start_id=self._claim_cursors.get(stream, "0-0"), count=room
            )
            self._claim_cursors[stream] = _text(reply[0])
            if reply[1]:
                log.warning("event=deliveries_taken_over count=%s", len(reply[1]))
                room -= await self._start(reply[1])
                if room <= 0:
                    return

    async def _forget_consumers(self) -> None:
        for stream in self._streams:
            for info in await self.redis.xinfo_consumers(stream, GROUP):
                name = _text(info["name"])
                if name != self.consumer and not info["pending"] and info["idle"] > FORGET_CONSUMER_AFTER_MS:
                    await self.redis.xgroup_delconsumer(stream, GROUP, name)

    async def _wait_for_room(self) -> int:
        while len(self._tasks) >= self.settings.webhook_concurrency:
            self._room.clear()
            await self._room.wait()
        return self.settings.webhook_concurrency - len(self._tasks)

    async def _start(self, entries: list[tuple[Any, Any]]) -> int:
        """Start a task per entry, with what it needs read in one pipeline; returns how many started.

        redis-py's asyncio client costs far more per command than Redis does: one pipeline per batch
        (and settles gathered the same way, ``ScriptSink``) keeps a delivery's CPU on the node small.
        """
        found = [(_text(entry_id), decode_hash(fields)) for entry_id, fields in entries if fields is not None]
        if not found:
            return 0
        try:
            replies = iter(await self._read_states(found))
        except NoScriptError:  # Redis restarted (or its scripts were flushed) since the script was loaded
            await self.redis.script_load(RECORD_JSON_LUA)
            replies = iter(await self._read_states(found))
        for entry_id, entry in found:
            stored = decode_hash(next(replies)) if entry.get(AGAIN) else {}
            record = json.loads(next(replies))
            task = asyncio.create_task(self._handle(entry_id, entry, stored, record))
            self._tasks.add(task)
            task.add_done_callback(self._finished)
        return len(found)

    async def _read_states(self, found: list[tuple[str, dict[str, str]]]) -> list[Any]:
        """Per entry: the stored state (only an entry put back for a retry, or by hand, has one), then the record."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, entry in found:
                if entry.get(AGAIN):
                    pipe.hgetall(self.keys.delivery(entry_delivery_id(entry), entry.get(JOB, "")))
                # EVALSHA itself: redis-py's Script in a pipeline asks SCRIPT EXISTS before every batch.
                pipe.execute_command("EVALSHA", self._record.sha, 1, self.keys.job(entry.get(JOB, "")))
            return await pipe.execute()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._room.set()

    # ---- one delivery ------------------------------------------------------------------------

    async def _handle(
        self, entry_id: str, entry: dict[str, str], stored: dict[str, str], record: dict[str, Any]
    ) -> None:
        kind, job_id = entry.get(KIND, ""), entry.get(JOB, "")
        did = entry_delivery_id(entry)
        try:
            plan = stored or self._plan(entry, record)
            if plan is None:
                log.warning("event=delivery_dropped id=%s: the job's record is gone", did)
                await self._settle_entry(entry_id, did, "delivered", 0, {})
                self.tally.delivery(_kind(kind), "dropped")
                return
            attempt = await self._attempt(kind, did, plan)
            self.tally.attempt(_kind(kind), metrics.attempt_label(attempt.label))
            await self._settle_attempt(entry_id, did, plan, attempt)
        except (RedisError, OSError):
            # Not settled: the entry stays pending and is taken over after webhook_claim_idle_s.
            log.warning("event=delivery_unsettled id=%s", did, exc_info=True)
        except Exception as err:  # a record or state this version cannot read: a dead letter, not a loop
            log.exception("event=delivery_failed id=%s", did)
            state = {KIND: kind, JOB: job_id, ATTEMPTS: "0", LAST_ERROR: f"internal error: {err!r}"[:500]}
            with contextlib.suppress(RedisError, OSError):
                await self._settle_entry(entry_id, did, "dead", time.time(), {**state, GAVE_UP_AT: repr(time.time())})

    def _plan(self, entry: dict[str, str], record: dict[str, Any]) -> dict[str, str] | None:
        """What to deliver, from the entry and the job's record: target, queue, body; None if nothing."""
        kind, job_id, event = entry.get(KIND, ""), entry.get(JOB, ""), entry.get(EVENT, "")
        rec = JobRecord.from_redis(record)
        if event and kind == WEBHOOK and rec is not None:
            return self._progress_plan(entry, rec)
        if rec is None or not rec.terminal:
            return None
        plan = {KIND: kind, JOB: job_id, EVENT_AT: repr(rec.finished_at or time.time())}
        if kind == WEBHOOK:
            if not rec.webhook:
                return None
            body = webhook_body(job_id, rec, usage_cost_usd=self._cost(rec))
            text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
            return {**plan, TENANT: rec.tenant, TARGET: rec.webhook, BODY: text}
        if kind == CALLBACK and rec.on_done:
            args = callback_args(job_id, rec)
            queue = rec.on_done_queue or DEFAULT_CALLBACK_QUEUE
            return {**plan, TARGET: rec.on_done, QUEUE: queue, BODY: json.dumps(args, separators=(",", ":"))}
        return None

    def _progress_plan(self, entry: dict[str, str], rec: JobRecord) -> dict[str, str] | None:
        """A ``started`` or ``retry`` webhook: its body from what the entry saw when it was handed off."""
        if not rec.webhook:
            return None
        seen: dict[str, Any] = json.loads(entry[EVENT_JSON]) if entry.get(EVENT_JSON) else {}
        if entry.get(ATTEMPT):
            seen["attempt"] = int(entry[ATTEMPT])
        body = progress_body(entry[JOB], rec, entry[EVENT], seen)
        at = seen.get("ts") or rec.started_at or time.time()
        plan = {KIND: WEBHOOK, JOB: entry[JOB], EVENT: entry[EVENT], EVENT_AT: repr(at), TARGET: rec.webhook}
        plan[TENANT] = rec.tenant
        return {**plan, BODY: json.dumps(body, separators=(",", ":"), ensure_ascii=False)}

    def _signing_keys(self, tenant: str | None) -> list[bytes]:
        """The tenant's ``webhook_secrets`` when the tenants file gives it some, else the node's."""
        if tenant and tenant in self.tenants:
            return self.tenants.get(tenant).webhook_keys or self.secrets
        return self.secrets

    def _cost(self, rec: JobRecord) -> float | None:
        usage = (rec.result_data() or {}).get("usage") if rec.result else None
        return round(cost_usd(token_counts(usage), self.prices.get(rec.model)), 8) if usage else None

    async def _attempt(self, kind: str, did: str, plan: dict[str, str]) -> Attempt:
        body = plan[BODY].encode()
        if kind == CALLBACK:
            try:
                await self.callbacks.send(
                    plan[TARGET], plan.get(QUEUE) or DEFAULT_CALLBACK_QUEUE, json.loads(body), did
                )
            except Exception as err:  # whatever the broker connection raised: retried
                return Attempt("retry", "error", None, f"{type(err).__name__}: {err}"[:300])
            return Attempt("delivered", "sent")
        secrets = self._signing_keys(plan.get(TENANT))
        if not secrets:
            return Attempt(
                "give_up", "unsigned", None, "MOONQ_WEBHOOK_SECRET is not set on the node: nothing to sign with"
            )
        headers = signed_headers(secrets, did, int(time.time()), body)
        return await self.http.post(plan[TARGET], body, headers)

    async def _settle_attempt(self, entry_id: str, did: str, plan: dict[str, str], attempt: Attempt) -> None:
        s, now = self.settings, time.time()
        n = int(plan.get(ATTEMPTS) or 0) + 1
        first_at = float(plan.get(FIRST_AT) or now)
        kind = _kind(plan.get(KIND, ""))
        where = shown_target(plan.get(TARGET, ""))
        if attempt.verdict == "delivered":
            if await self._settle_entry(entry_id, did, "delivered", now, {}):
                self.tally.delivery(kind, "delivered")
                since = float(plan.get(EVENT_AT) or plan.get("finished_at") or now)  # stored by an older version
                self.tally.latency(kind, max(0.0, now - since))
                log.debug("event=delivery_delivered id=%s target=%s attempts=%s", did, where, n)
            return
        note = f"{attempt.status or attempt.label}: {attempt.note}".strip()[:500]
        state = {**plan, ATTEMPTS: str(n), FIRST_AT: repr(first_at), LAST_ERROR: note}
        if attempt.verdict == "retry":
            delay = max(backoff_s(n, s.webhook_backoff_base_s, s.webhook_backoff_max_s), attempt.retry_after_s or 0.0)
            delay = min(delay, s.webhook_backoff_max_s)
            if now + delay - first_at <= s.webhook_retry_for_s:
                state[NEXT_AT] = repr(now + delay)
                if await self._settle_entry(entry_id, did, "retry", now + delay, state):
                    log.info(
                        "event=delivery_retry id=%s target=%s attempt=%s delay_s=%.1f error=%r",
                        did,
                        where,
                        n,
                        delay,
                        note,
                    )
                return
            state[LAST_ERROR] = f"gave up after {n} attempts over {now - first_at:.0f} s; last: {note}"[:500]
        state[GAVE_UP_AT] = repr(now)
        if await self._settle_entry(entry_id, did, "dead", now, state):
            self.tally.delivery(kind, "dead")
            log.warning("event=delivery_dead id=%s target=%s attempts=%s error=%r", did, where, n, state[LAST_ERROR])

    async def _settle_entry(self, entry_id: str, did: str, outcome: str, score: float, state: dict[str, str]) -> bool:
        s, k = self.settings, self.keys
        ttl_s = s.result_ttl_s if outcome == "dead" else int(s.webhook_retry_for_s) + s.result_ttl_s
        pairs = [x for kv in state.items() for x in kv]
        args: list[str | float] = [entry_id, GROUP, outcome, did, score, ttl_s, time.time() - s.result_ttl_s]
        args += [s.result_ttl_s, *pairs]
        # The entry's stream is its job's group's (every writer adds it there), and a delivery id names the job.
        job_id = did.split(":")[1] if ":" in did else ""
        group = group_of(job_id)
        keys = [
            k.deliveries_in(group),
            k.delivery(did, job_id),
            k.deliveries_due_in(group),
            k.deliveries_dead_in(group),
        ]
        return bool(await self._settle(keys=keys, args=args))

    async def aclose(self) -> None:
        await self.http.aclose()
        await asyncio.to_thread(self.callbacks.close)
        await self.redis.aclose()


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _kind(kind: str) -> str:
    return kind if kind in metrics.KINDS else metrics.OTHER
