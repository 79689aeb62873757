"""The writes a producer makes: submit, submit many, retry, cancel, list dead letters.

Synchronous (Celery's producer is), and shared by both clients: ``Client`` calls it directly,
``AsyncClient`` from a worker thread (``asyncio.to_thread``). It deals in job ids; the clients
wrap them in their ``Job`` / ``AsyncJob`` handles.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict, Unpack

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from moonq import budgets
from moonq.broker import producer_app, send_envelope
from moonq.errors import InvalidRequest, JobNotFound, TenantBudgetExceeded, TenantModelNotAllowed
from moonq.eventlog import append_args, append_lua, event_body
from moonq.indexes import newest_first
from moonq.keys import GROUPS, Keys, group_of, new_job_id
from moonq.models import check_builtin_tools
from moonq.record import DEFAULT_TENANT, SET_IF_EXISTS_LUA, JobField, JobRecord, JobStatus, new_record, record_lua
from moonq.settings import ClientSettings
from moonq.tenants import SETTING as TENANTS_SETTING
from moonq.tenants import TenantConfig, Tenants, cached_tenants
from moonq.webhooks import callback_fields
from moonq.wire import ChatRequest, JobEnvelope, check_priority, validate_request

# KEYS[1] idempotency key, KEYS[2] job hash, KEYS[3] active-jobs index. ARGV[1] job id, ARGV[2]
# request digest, ARGV[3] enqueued_at (the index's score), ARGV[4..] job record field/value pairs.
# Records the job under the key unless the key is taken; returns "" when it recorded, else the stored
# "<job id>|<digest>" of the first submission. Like the record, the key has no TTL while the job is
# active (so it cannot lapse while the job waits or runs, and a resubmit cannot run it twice); the
# write that ends the job gives both their TTL (moonq/eventlog.py), the record naming the key.
IDEMPOTENCY_LUA = record_lua("""
local first = redis.call('GET', KEYS[1])
if first then return first end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2])
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[2], $idem_key, KEYS[1])
redis.call('ZADD', KEYS[3], tonumber(ARGV[3]), ARGV[1])
return ''
""")

# Undo a submit whose message the broker refused. KEYS[1] job hash, KEYS[2] active-jobs index, KEYS[3]
# (optional) idempotency key. ARGV[1] job id. The key goes too, but only while it names this job: a
# retry with the same key then submits afresh instead of finding a job that never existed.
FORGET_LUA = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if KEYS[3] then
  local stored = redis.call('GET', KEYS[3])
  if stored and string.sub(stored, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then redis.call('DEL', KEYS[3]) end
end
return 1
"""


class JobOptions(TypedDict, total=False):
    """What a submit may say beside the request, its priority and idempotency key (``Client.submit``
    documents each): where its end is delivered, its builtin tools mode, and its tenant."""

    webhook: str | None
    webhook_events: Sequence[str] | None
    on_done: str | None
    on_done_queue: str | None
    builtin_tools: str | None
    tenant: str | None


# A job recorded under an idempotency key but never sent (its submitter died) is sent again by a
# later submitter once it is this old.
RESEND_AFTER_S = 5.0
# Jobs per pipelined batch of ``submit_many``.
BULK_CHUNK = 1000


class Submitter:
    """Enqueues and ends jobs on one queue, through ``client`` (Redis) and a Celery producer."""

    def __init__(self, settings: ClientSettings, client: redis.Redis) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.redis = client
        self._append = client.register_script(append_lua(client))
        self._claim_key = client.register_script(IDEMPOTENCY_LUA)
        self._set_field = client.register_script(SET_IF_EXISTS_LUA)
        self._forget = client.register_script(FORGET_LUA)
        self._celery = producer_app(settings)
        self.tenants: Tenants = cached_tenants(settings.tenants_file)

    def record(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The job's record, or None when it is unknown (or expired), or another tenant's (``tenant`` set)."""
        rec = JobRecord.from_redis(self.redis.hgetall(self.keys.job(job_id)))
        return rec if rec is not None and (tenant is None or rec.tenant == tenant) else None

    def tenant(self, name: str | None) -> tuple[str, TenantConfig]:
        """The tenant a submit goes to, and its configuration.

        Raises:
            InvalidRequest: naming ``tenant``: none given while a tenants file configures tenants, or
                one that it does not configure.
        """
        if name is None:
            if self.settings.tenants_file:
                raise InvalidRequest([("tenant", f"is required: {TENANTS_SETTING} configures tenants; name one")])
            name = DEFAULT_TENANT
        if not isinstance(name, str) or name not in self.tenants:
            shown = name[:64] if isinstance(name, str) else name
            raise InvalidRequest([("tenant", f"{shown!r} is not a tenant configured in {TENANTS_SETTING}")])
        return name, self.tenants.get(name)

    def _admit(self, name: str, config: TenantConfig, model: str, priority: int, prefix: str = "") -> None:
        """The tenant's rules for one request: its models and the most urgent priority it may ask for."""
        if not config.allows_model(model):
            raise TenantModelNotAllowed(name, model, f"{prefix}model")
        if not config.allows_priority(priority):
            most = config.max_priority
            raise InvalidRequest([("priority", f"tenant {name!r} may ask for priorities {most} to 9 (got {priority})")])

    def _within_budget(self, name: str, config: TenantConfig, idempotency_key: str | None = None) -> None:
        """Refuse a tenant whose daily budget is spent: one read, and none for a tenant without a budget.

        Raises:
            TenantBudgetExceeded: naming the tenant, the budget and what was spent today (UTC).
        """
        if not budgets.limits(config):
            return
        day = budgets.utc_day(time.time())
        spent = self.redis.hmget(budgets.key(self.keys.prefix, name, day), budgets.FIELDS)
        try:
            budgets.check(name, config, budgets.Spend.from_redis(spent), day)
        except TenantBudgetExceeded:
            # An idempotency key used before still finds its job (a batch resumed): that starts nothing new.
            if idempotency_key is None or not self.redis.exists(self.keys.idempotency(idempotency_key, name)):
                raise

    def submit(
        self,
        request: dict[str, Any] | ChatRequest,
        *,
        priority: int,
        idempotency_key: str | None = None,
        **options: Unpack[JobOptions],
    ) -> str:
        """As ``Client.submit``; returns the job id."""
        priority = check_priority(priority)
        name, config = self.tenant(options.get("tenant"))
        owed = _owed(options, config)
        if idempotency_key is not None and not (isinstance(idempotency_key, str) and 0 < len(idempotency_key) <= 255):
            raise InvalidRequest([("idempotency_key", "must be a non-empty string of at most 255 characters")])
        valid = validate_request(request)
        self._admit(name, config, valid.model, priority)
        self._within_budget(name, config, idempotency_key)
        payload = valid.to_payload()
        # A job with an idempotency key gets an id in the key's group: the key and the record share a slot.
        group = None if idempotency_key is None else Keys.idempotency_group(idempotency_key, name)
        envelope = JobEnvelope(job_id=new_job_id(group), request=payload, priority=priority)
        extra = {**owed, **_options(options.get("builtin_tools"), valid.n), JobField.TENANT: name}
        return self._enqueue(envelope, extra, idempotency_key, name)

    def submit_many(
        self,
        requests: Iterable[dict[str, Any] | ChatRequest],
        *,
        priority: int,
        **options: Unpack[JobOptions],
    ) -> list[str]:
        """As ``Client.submit_many``; returns the job ids, in request order."""
        priority = check_priority(priority)
        name, config = self.tenant(options.get("tenant"))
        owed = _owed(options, config)
        owed[JobField.TENANT] = name
        envelopes = []
        for i, request in enumerate(requests):
            try:
                valid = validate_request(request)
                self._admit(name, config, valid.model, priority, f"requests.{i}.")
                owed.update(_options(options.get("builtin_tools"), valid.n))  # the same for all: n decides, per request
                payload = valid.to_payload()
            except InvalidRequest as err:
                raise InvalidRequest([(f"requests.{i}.{field}", rule) for field, rule in err.errors]) from None
            envelopes.append(JobEnvelope(job_id=new_job_id(), request=payload, priority=priority))
        self._within_budget(name, config)
        for start in range(0, len(envelopes), BULK_CHUNK):
            self._enqueue_bulk(envelopes[start : start + BULK_CHUNK], owed)
        return [e.job_id for e in envelopes]

    def retry(self, job_id: str, tenant: str | None = None) -> str:
        """As ``Client.retry``; returns the new job's id (the old job's tenant's)."""
        rec = self.record(job_id, tenant)
        if rec is None:
            raise JobNotFound(job_id)
        if rec.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise InvalidRequest(
                [("job", f"only a failed or cancelled job can be retried (job {job_id} is {rec.status.value})")]
            )
        if rec.tenant in self.tenants:  # a re-run spends like a new job
            self._within_budget(rec.tenant, self.tenants.get(rec.tenant))
        old = JobEnvelope.model_validate_json(rec.envelope or "")
        envelope = JobEnvelope(job_id=new_job_id(), request=old.request, priority=old.priority)
        # The re-run owes what the first run owed: its webhook and callback go with it.
        carried = (JobField.WEBHOOK, JobField.WEBHOOK_EVENTS, JobField.ON_DONE, JobField.ON_DONE_QUEUE)
        owed = {f: getattr(rec, f.value) for f in carried}
        owed[JobField.BUILTIN_TOOLS] = rec.builtin_tools  # and so does its builtin_tools option
        owed[JobField.TENANT] = rec.tenant
        new_id = self._enqueue(envelope, {JobField.RETRY_OF: job_id, **{f: v for f, v in owed.items() if v}})
        self.redis.zrem(self.keys.failed_for(job_id), job_id)
        return new_id

    def failed(self, limit: int, tenant: str | None = None) -> list[dict[str, Any]]:
        """As ``Client.failed``: ``tenant``'s dead letters only, when it is set."""
        out: list[dict[str, Any]] = []
        start = 0
        indexes = [self.keys.failed_in(g) for g in GROUPS]
        while len(out) < limit:
            # Pages of the fleet-wide list, until ``limit`` of this tenant's are found or the list ends.
            page = newest_first(self.redis, indexes, max(limit, 100), offset=start)
            start += len(page)
            for job_id, finished_at in page:
                rec = self.record(job_id, tenant)
                if rec is not None and rec.status is JobStatus.FAILED and len(out) < limit:  # not expired or re-run
                    out.append(
                        {
                            "id": job_id,
                            "tenant": rec.tenant,
                            "model": rec.model or None,
                            "finished_at": finished_at,
                            "attempts": rec.attempt,
                            "error": rec.error_info(),
                        }
                    )
            if not page or tenant is None:
                break
        return out

    def cancel(self, job_id: str, tenant: str | None = None) -> bool:
        """As ``Job.cancel``: False if the job had already ended.

        Raises:
            JobNotFound: no such job (or another tenant's, ``tenant`` set).
        """
        rec = self.record(job_id, tenant)
        if rec is None:
            raise JobNotFound(job_id)
        if rec.terminal:
            return False
        self.mark(job_id, JobField.CANCEL_REQUESTED, "1")
        # Still queued: end it here and now; the worker that later receives it will skip it.
        keys, argv = append_args(
            self.keys,
            job_id,
            [event_body(job_id, "cancelled")],
            ttl_s=self.settings.result_ttl_s,
            require_status=JobStatus.QUEUED,
            fields={JobField.STATUS: JobStatus.CANCELLED, JobField.FINISHED_AT: repr(time.time())},
            idempotency_key=rec.idem_key or "",
        )
        if not self._append(keys=keys, args=argv):
            # Running (or retrying): the node running it aborts the stream and ends it cancelled.
            self.redis.publish(self.keys.cancel, job_id)
        return True

    def mark(self, job_id: str, field: JobField | str, value: str) -> bool:
        """Set one field of a job's record, only while the record exists (never a record nobody owns)."""
        return bool(self._set_field(keys=[self.keys.job(job_id)], args=[field, value]))

    def close(self) -> None:
        self._celery.close()

    def _enqueue(
        self,
        envelope: JobEnvelope,
        extra: Mapping[str, str],
        idempotency_key: str | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> str:
        job_key = self.keys.job(envelope.job_id)
        # The record (and the job's place in the active index, which owns it until the job ends)
        # exists before the message does, so a worker always finds it.
        record = {**_record(envelope), **extra}
        idem = self.keys.idempotency(idempotency_key, tenant) if idempotency_key is not None else ""
        if not idem:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(job_key, mapping=record)  # type: ignore[arg-type]
                pipe.zadd(self.keys.active_for(envelope.job_id), {envelope.job_id: envelope.enqueued_at})
                self._remember(pipe, {envelope.job_id: envelope.enqueued_at}, record[JobField.TENANT])
                pipe.execute()
        else:
            assert idempotency_key is not None
            digest = _request_digest(envelope)
            flat = [x for kv in record.items() for x in kv]
            keys = [idem, job_key, self.keys.active_for(envelope.job_id)]
            first = self._claim_key(keys=keys, args=[envelope.job_id, digest, envelope.enqueued_at, *flat])
            if first:
                return self._existing(first.decode(), digest, idempotency_key, envelope, extra, tenant)
            with self.redis.pipeline(transaction=False) as pipe:
                self._remember(pipe, {envelope.job_id: envelope.enqueued_at}, record[JobField.TENANT])
                pipe.execute()
        self._send(envelope, idem, record[JobField.TENANT])
        # Sent: from now on the sweeper looks for its message before re-sending it (worker/sweeper.py).
        self.mark(envelope.job_id, JobField.SENT, "1")
        return envelope.job_id

    def _enqueue_bulk(self, envelopes: list[JobEnvelope], extra: Mapping[str, str]) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for envelope in envelopes:
                record = {**_record(envelope), **extra}
                pipe.hset(self.keys.job(envelope.job_id), mapping=record)  # type: ignore[arg-type]
            for active, enqueued in _by_group(envelopes, self.keys.active_in).items():
                pipe.zadd(active, enqueued)
            self._remember(
                pipe, {e.job_id: e.enqueued_at for e in envelopes}, extra.get(JobField.TENANT, DEFAULT_TENANT)
            )
            pipe.execute()
        try:
            # kombu's producer batch buffers the queue pushes into one Redis pipeline (other brokers: one by one).
            tenant = extra.get(JobField.TENANT, DEFAULT_TENANT)
            with self._celery.producer_or_acquire() as producer, producer.batch(max_size=BULK_CHUNK):
                for envelope in envelopes:
                    send_envelope(self._celery, self.settings, envelope, producer=producer, tenant=tenant)
        except Exception:
            forget = [([self.keys.job(e.job_id), self.keys.active_for(e.job_id)], [e.job_id]) for e in envelopes]
            self._pipelined(self._forget, forget)
            raise
        self._pipelined(self._set_field, [([self.keys.job(e.job_id)], [JobField.SENT, "1"]) for e in envelopes])

    def _pipelined(self, script: Script, calls: Sequence[tuple[list[str], list[str]]]) -> None:
        """``script`` once per ``(keys, args)``, in one pipeline (on a Redis Cluster, one per shard).

        EVALSHA by hand: redis-py's cluster pipelines refuse Script objects. A NOSCRIPT (a Redis
        restarted since, or a shard that never saw the script) loads it everywhere and runs them again:
        a call answered NOSCRIPT ran nothing, and these scripts are idempotent besides.
        """
        for attempt in (1, 2):
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for keys, args in calls:
                        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
                    pipe.execute()
                return
            except NoScriptError:
                if attempt == 2:
                    raise
                self.redis.script_load(script.script)

    def _remember(self, pipe: redis.client.Pipeline, enqueued: Mapping[str, float], tenant: str) -> None:
        """Queue on ``pipe`` the jobs' entries in their groups' recent-jobs indexes (``P:recent:{g}``, and
        ``P:recent:<tenant>:{g}`` for the tenant's own list; moonq/keys.py).

        Bounded by age: entries older than a record's lifetime are trimmed, and each key expires that
        long after its newest entry. A job whose send then fails keeps its entry; readers skip ids
        whose record is gone.
        """
        ttl_s = self.settings.result_ttl_s
        by_group: dict[int, dict[str, float]] = {}
        for job_id, at in enqueued.items():
            by_group.setdefault(group_of(job_id), {})[job_id] = at
        for group, entries in by_group.items():
            for index in (self.keys.recent_in(group), self.keys.recent_in(group, tenant)):
                pipe.zadd(index, entries)
                pipe.zremrangebyscore(index, "-inf", time.time() - ttl_s)
                pipe.expire(index, ttl_s)

    def _send(self, envelope: JobEnvelope, idem: str, tenant: str) -> None:
        try:
            send_envelope(self._celery, self.settings, envelope, tenant=tenant)
        except Exception:
            keys = [self.keys.job(envelope.job_id), self.keys.active_for(envelope.job_id), *([idem] if idem else [])]
            self._forget(keys=keys, args=[envelope.job_id])
            raise

    def _existing(
        self, stored: str, digest: str, key: str, envelope: JobEnvelope, extra: Mapping[str, str], tenant: str
    ) -> str:
        job_id, _, first_digest = stored.partition("|")
        if first_digest != digest:
            raise InvalidRequest([("idempotency_key", f"{key!r} was used for a different request (job {job_id})")])
        if self.record(job_id) is None:
            # The key outlived its job (a key written before keys were tied to their record's life):
            # release it and submit afresh, rather than hand back an id that answers "not found".
            idem = self.keys.idempotency(key, tenant)
            self._forget(keys=[self.keys.job(job_id), self.keys.active_for(job_id), idem], args=[job_id])
            return self._enqueue(envelope, extra, key, tenant)
        # Recorded but not (yet) sent: the first submitter is sending it now, or died before it could.
        # Wait until it is sent or RESEND_AFTER_S old, then send it ourselves; returning without
        # either could leave the job queued forever. (A duplicate message is harmless: the claim runs
        # a job once.)
        while True:
            rec = self.record(job_id)
            if rec is None or rec.status is not JobStatus.QUEUED or rec.sent:
                return job_id
            if time.time() - (rec.enqueued_at or 0.0) > RESEND_AFTER_S:
                envelope = JobEnvelope.model_validate_json(rec.envelope or "")
                send_envelope(self._celery, self.settings, envelope, tenant=rec.tenant)
                self.mark(job_id, JobField.SENT, "1")
                return job_id
            time.sleep(0.1)


def _by_group(envelopes: Sequence[JobEnvelope], index: Any) -> dict[str, dict[str, float]]:
    """``{index(group): {job id: enqueued_at}}`` for the envelopes' groups."""
    out: dict[str, dict[str, float]] = {}
    for e in envelopes:
        out.setdefault(index(group_of(e.job_id)), {})[e.job_id] = e.enqueued_at
    return out


def _record(envelope: JobEnvelope) -> dict[str, str]:
    """A new job's record, written before its message is sent."""
    return new_record(
        model=str(envelope.request["model"]),
        enqueued_at=envelope.enqueued_at,
        priority=envelope.priority,
        envelope_json=envelope.model_dump_json(),
    )


def _owed(options: JobOptions, config: TenantConfig) -> dict[str, str]:
    """The record fields of a submit's webhook and callback options (the tenant's webhook URL by default)."""
    return callback_fields(
        webhook=options.get("webhook") or config.webhook_url,
        webhook_events=options.get("webhook_events"),
        on_done=options.get("on_done"),
        on_done_queue=options.get("on_done_queue"),
    )


def _options(builtin_tools: object, n: int | None, field: str = "builtin_tools") -> dict[str, str]:
    """The record fields of the options that travel beside the request (moonq/models.py)."""
    mode = check_builtin_tools(builtin_tools, n, field)
    return {JobField.BUILTIN_TOOLS: mode} if mode is not None else {}


def _request_digest(envelope: JobEnvelope) -> str:
    body = json.dumps({"request": envelope.request, "priority": envelope.priority}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()
