"""The writes a producer makes: submit, submit many, retry, cancel, list dead letters.

Synchronous (Celery's producer is), and shared by both clients: ``Client`` calls it directly,
``AsyncClient`` from a worker thread (``asyncio.to_thread``). It deals in job ids; the clients
wrap them in their ``Job`` / ``AsyncJob`` handles.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import redis
from celery import Celery
from celery.utils.nodenames import anon_nodename
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from moonq import budgets
from moonq.broker import PRIORITY_SEP, message_priority, producer_app, queue_for, send_envelope
from moonq.errors import InvalidRequest, JobNotFound, TenantBudgetExceeded, TenantModelNotAllowed
from moonq.eventlog import append_args, append_lua, event_body
from moonq.indexes import newest_first
from moonq.keys import GROUPS, Keys, group_of, new_job_id, uuid4_str
from moonq.models import check_builtin_tools
from moonq.record import DEFAULT_TENANT, SET_IF_EXISTS_LUA, JobField, JobRecord, JobStatus, new_record, record_lua
from moonq.redisurl import is_cluster_client
from moonq.settings import REDIS_SCHEMES, ClientSettings, url_scheme
from moonq.tenants import SETTING as TENANTS_SETTING
from moonq.tenants import TenantConfig, Tenants, cached_tenants
from moonq.webhooks import callback_fields
from moonq.wire import SCHEMA_VERSION, TASK_NAME, ChatRequest, JobEnvelope, check_priority, validate_request

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


# A direct enqueue's writes (``Submitter.push_commands``) as one script call. ARGV is a run of commands,
# each given as its argument count, then the command and its arguments. One command and one reply per
# enqueue instead of a MULTI's dozen (redis-py packs each command and parses each reply in Python, one
# by one: a submit's CPU fell ~12% with this, a gateway request's ~5%); atomic, as the MULTI was. The
# keys are not declared: a direct enqueue only happens on one plain Redis (never a Cluster). A chunk of
# ``BULK_CHUNK`` jobs makes commands of at most ~2 x BULK_CHUNK arguments (Lua's unpack takes ~8,000).
COMMANDS_LUA = """
local i = 1
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"""


class Commands:
    """Writes recorded for ``COMMANDS_LUA``, with the pipeline methods ``Submitter._write`` calls;
    ``args`` is the script's ARGV (numbers as redis-py would send them)."""

    def __init__(self) -> None:
        self.args: list[str | float | int] = []

    def _add(self, *command: str | float | int) -> None:
        self.args.append(len(command))
        self.args.extend(command)

    def hset(
        self, name: str, key: str | None = None, value: str | None = None, mapping: Mapping[str, str] | None = None
    ) -> None:
        pairs = [
            *(() if key is None or value is None else (key, value)),
            *(x for kv in (mapping or {}).items() for x in kv),
        ]
        self._add("HSET", name, *pairs)

    def zadd(self, name: str, mapping: Mapping[str, float]) -> None:
        self._add("ZADD", name, *(x for member, score in mapping.items() for x in (score, member)))

    def zremrangebyscore(self, name: str, min: str | float, max: str | float) -> None:
        self._add("ZREMRANGEBYSCORE", name, min, max)

    def expire(self, name: str, time: int) -> None:
        self._add("EXPIRE", name, time)

    def lpush(self, name: str, *values: str) -> None:
        self._add("LPUSH", name, *values)


class JobOptions(TypedDict, total=False):
    """What a submit may say beside the request, its priority and idempotency key (``Client.submit``
    documents each): where its end is delivered, its builtin tools mode, and its tenant."""

    webhook: str | None
    webhook_events: Sequence[str] | None
    on_done: str | None
    on_done_queue: str | None
    builtin_tools: str | None
    tenant: str | None


@dataclass(frozen=True, slots=True)
class SubmitItem:
    """One job of ``submit_many`` with options of its own (``Client.submit`` documents each).

    A field left None takes the value ``submit_many`` was called with; the tenant is the call's.
    """

    request: dict[str, Any] | ChatRequest
    idempotency_key: str | None = None
    priority: int | None = None
    webhook: str | None = None
    webhook_events: Sequence[str] | None = None
    on_done: str | None = None
    on_done_queue: str | None = None
    builtin_tools: str | None = None


@dataclass(slots=True)
class _Job:
    """A validated job on its way in: its envelope, its record, and its idempotency key if any."""

    envelope: JobEnvelope
    record: dict[str, str]
    key: str | None = None  # the caller's idempotency key
    idem: str = ""  # its Redis key
    digest: str = ""  # of the request and priority, stored beside the key

    @property
    def id(self) -> str:
        return self.envelope.job_id


# Celery's protocol 2 "embed" argument: no callbacks, errbacks, chain or chord.
_EMBED_JSON = json.dumps({"callbacks": None, "errbacks": None, "chain": None, "chord": None})


class TaskMessages:
    """The Celery task messages of moonq's jobs, built here and pushed on the broker's list by the caller.

    Used when the broker is the data Redis itself: the push then rides in the same script call
    (``Submitter.push_commands``) as the job's record, its indexes and its ``sent`` mark, instead of one
    publish through Celery and kombu per job (about half the cost of a submit in a profile, the rest
    being Redis round trips). The message is byte for byte what ``send_envelope`` sends through kombu's Redis transport
    (protocol 2, JSON, base64 body, a fresh delivery tag; tests/test_bulk.py compares the two), on the
    list kombu would push it to.
    """

    def __init__(self, app: Celery, settings: ClientSettings) -> None:
        self.settings = settings
        self.prefix = settings.keys.broker_prefix
        self.origin = anon_nodename()
        self.reply_to = str(app.thread_oid)
        self._lists: dict[tuple[str, int], str] = {}
        self._templates: dict[tuple[str, int], str] = {}

    def list_for(self, tenant: str, priority: int) -> str:
        """The Redis list kombu's transport pushes a message of ``tenant`` at ``priority`` on."""
        name = self._lists.get((tenant, priority))
        if name is None:
            pri = message_priority(self.settings, priority)
            name = f"{self.prefix}{queue_for(self.settings, tenant)}" + (f"{PRIORITY_SEP}{pri}" if pri else "")
            self._lists[(tenant, priority)] = name
        return name

    def message(self, envelope: JobEnvelope, tenant: str) -> str:
        """The message of ``envelope``'s job, as kombu's Redis transport stores it (JSON)."""
        template = self._templates.get((tenant, envelope.priority))
        if template is None:
            template = self._templates[(tenant, envelope.priority)] = self._template(tenant, envelope.priority)
        job_id = envelope.job_id
        enqueued_at = float(envelope.enqueued_at)
        ticket = (
            f'[[{{"v": {int(envelope.v)}, "job_id": {json.dumps(job_id)}, "enqueued_at": {enqueued_at!r},'
            f' "priority": {int(envelope.priority)}}}], {{}}, {_EMBED_JSON}]'
        )
        return template % {
            "body": base64.b64encode(ticket.encode()).decode(),
            "id": json.dumps(job_id),
            "argsrepr": json.dumps(f"(<job {job_id} {envelope.request.get('model')}>,)"),
            "tag": uuid4_str(),
        }

    def _template(self, tenant: str, priority: int) -> str:
        """The message of one queue and priority with ``%(name)s`` where each job's values go: built
        once from the whole dict (a json.dumps of it per job is most of a message's cost)."""
        slot = {name: f"@@{name}@@" for name in ("body", "id", "argsrepr", "tag")}
        headers = {
            "lang": "py",
            "task": TASK_NAME,
            "id": slot["id"],
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": slot["id"],
            "parent_id": None,
            "argsrepr": slot["argsrepr"],
            "kwargsrepr": "{}",
            "origin": self.origin,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }
        properties = {
            "correlation_id": slot["id"],
            "reply_to": self.reply_to,
            "argsrepr": slot["argsrepr"],
            "kwargsrepr": "{}",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue_for(self.settings, tenant)},
            "priority": message_priority(self.settings, priority),
            "body_encoding": "base64",
            "delivery_tag": slot["tag"],
        }
        whole = {
            "body": slot["body"],
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        }
        template = json.dumps(whole).replace("%", "%%")
        for name in ("id", "argsrepr"):  # JSON values of their own (quoted and escaped per job)
            template = template.replace(f'"@@{name}@@"', f"%({name})s")
        for name in ("body", "tag"):  # inside quotes: base64 and a uuid need no escaping
            template = template.replace(f"@@{name}@@", f"%({name})s")
        return template


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
        self._commands = client.register_script(COMMANDS_LUA)
        self._celery = producer_app(settings)
        self.tenants: Tenants = cached_tenants(settings.tenants_file)
        # The broker is this very Redis (not a Cluster, not through Sentinel): messages are pushed here.
        same = settings.broker_url == settings.redis_url and url_scheme(settings.broker_url) in REDIS_SCHEMES
        self._direct = TaskMessages(self._celery, settings) if same and not is_cluster_client(client) else None

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

    def _within_budget(self, name: str, config: TenantConfig, idems: Sequence[str] | None = None) -> None:
        """Refuse a tenant whose daily budget is spent: one read, and none for a tenant without a budget.

        ``idems``: the jobs' idempotency keys (Redis names), given only when every job has one.

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
            # Idempotency keys used before still find their jobs (a batch resumed): that starts nothing new.
            if not idems:
                raise
            with self.redis.pipeline(transaction=False) as pipe:
                for idem in idems:
                    pipe.exists(idem)
                if not all(pipe.execute()):
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
        job, config = self.prepare(request, priority, idempotency_key, options)
        idem = [job.idem] if job.idem else None
        self._within_budget(job.record[JobField.TENANT], config, idem)
        return self._enqueue(job)

    def prepare(
        self, request: dict[str, Any] | ChatRequest, priority: int, idempotency_key: str | None, options: JobOptions
    ) -> tuple[_Job, TenantConfig]:
        """A submit's checks that need no Redis, and its job (id, envelope, record); its tenant's config.

        Raises:
            InvalidRequest: naming the field and the rule (``TenantModelNotAllowed`` for a model).
        """
        priority = check_priority(priority)
        name, config = self.tenant(options.get("tenant"))
        owed = _owed(options, config)
        _check_key(idempotency_key, "idempotency_key")
        valid = validate_request(request)
        self._admit(name, config, valid.model, priority)
        extra = {**owed, **_options(options.get("builtin_tools"), valid.n), JobField.TENANT: name}
        return self._job(valid, priority, extra, idempotency_key, name), config

    @property
    def direct(self) -> bool:
        """Whether the broker is the data Redis itself, so an enqueue can be one script call there."""
        return self._direct is not None

    def pushes_directly(self, job: _Job, config: TenantConfig) -> bool:
        """Whether ``job`` is enqueued by ``push_commands`` alone: one script call on the data Redis, its
        broker, with no idempotency key to claim and no budget to read first."""
        return self._direct is not None and not job.idem and not budgets.limits(config)

    def push_commands(self, jobs: Sequence[_Job]) -> list[str | float | int]:
        """The ARGV of ``COMMANDS_LUA`` for a direct enqueue of ``jobs`` (one tenant's,
        ``pushes_directly``): the messages first (a push refused, its list not a list, stops the script
        before any record is written), then the records with their ``sent`` marks, the index entries, and
        the marks of keyed jobs, whose claims wrote their records. One script call is atomic: nothing sees a record
        before its message is pushed. The sync client runs it in ``_write_and_push``, the asyncio one
        through its own registration of the script."""
        assert self._direct is not None
        tenant = jobs[0].record[JobField.TENANT]
        commands = Commands()
        by_list: dict[str, list[str]] = {}
        for job in jobs:
            name = self._direct.list_for(tenant, job.envelope.priority)
            by_list.setdefault(name, []).append(self._direct.message(job.envelope, tenant))
        for name, messages in by_list.items():
            commands.lpush(name, *messages)  # in order: kombu pops a list from its other end
        self._write(commands, jobs, tenant, sent=True)
        for job in jobs:
            if job.idem:
                commands.hset(self.keys.job(job.id), JobField.SENT, "1")
        return commands.args

    def forget(self, jobs: Sequence[_Job]) -> None:
        """Undo jobs whose enqueue failed (their records, index entries and idempotency keys)."""
        self._forget_jobs(jobs)

    def submit_many(
        self,
        requests: Iterable[dict[str, Any] | ChatRequest | SubmitItem],
        *,
        priority: int,
        **options: Unpack[JobOptions],
    ) -> list[str]:
        """As ``Client.submit_many``; returns the job ids, in request order (a key seen before: its job's)."""
        priority = check_priority(priority)
        name, config = self.tenant(options.get("tenant"))
        owed = _owed(options, config)
        tools = options.get("builtin_tools")
        jobs: list[_Job] = []
        keyed: dict[str, tuple[int, str]] = {}  # idempotency key -> (first request with it, its digest)
        for i, item in enumerate(requests):
            try:
                key, prio, item_owed, item_tools, request = None, priority, owed, tools, item
                if isinstance(item, SubmitItem):
                    key, request = item.idempotency_key, item.request
                    prio = priority if item.priority is None else check_priority(item.priority)
                    item_owed = _owed_item(item, options, config) if _has_callbacks(item) else owed
                    item_tools = tools if item.builtin_tools is None else item.builtin_tools
                    _check_key(key, "idempotency_key")
                valid = validate_request(request)
                self._admit(name, config, valid.model, prio, f"requests.{i}.")
                extra = {**item_owed, **_options(item_tools, valid.n), JobField.TENANT: name}
                job = self._job(valid, prio, extra, key, name)
                if key is not None:
                    first = keyed.setdefault(key, (i, job.digest))
                    if first[1] != job.digest:
                        raise InvalidRequest(
                            [("idempotency_key", f"{key!r} was used for a different request (requests.{first[0]})")]
                        )
            except InvalidRequest as err:
                raise InvalidRequest([(f"requests.{i}.{field}", rule) for field, rule in err.errors]) from None
            jobs.append(job)
        idems = [j.idem for j in jobs if j.idem]
        self._within_budget(name, config, idems if len(idems) == len(jobs) else None)
        if idems:
            self._check_keys(jobs)
        ids: list[str] = []
        for start in range(0, len(jobs), BULK_CHUNK):
            ids += self._enqueue_bulk(jobs[start : start + BULK_CHUNK], name, start)
        return ids

    def _job(self, valid: ChatRequest, priority: int, extra: Mapping[str, str], key: str | None, tenant: str) -> _Job:
        """A validated request as a job: a fresh id (in its key's group, with a key), envelope and record."""
        payload = valid.to_payload()
        # A job with an idempotency key gets an id in the key's group: the key and the record share a slot.
        group = None if key is None else Keys.idempotency_group(key, tenant)
        # Built without validating again: the payload is a validated request's, the priority checked.
        envelope = JobEnvelope.model_construct(
            v=SCHEMA_VERSION, job_id=new_job_id(group), request=payload, enqueued_at=time.time(), priority=priority
        )
        job = _Job(envelope, {**_record(envelope), **extra})
        if key is not None:
            job.key, job.idem, job.digest = key, self.keys.idempotency(key, tenant), _request_digest(envelope)
        return job

    def _check_keys(self, jobs: Sequence[_Job]) -> None:
        """Refuse, before anything is written, a key a job of another request already holds."""
        keyed = [j for j in jobs if j.idem]
        for start in range(0, len(keyed), BULK_CHUNK):
            chunk = keyed[start : start + BULK_CHUNK]
            with self.redis.pipeline(transaction=False) as pipe:
                for job in chunk:
                    pipe.get(job.idem)
                stored = pipe.execute()
            for job, first in zip(chunk, stored, strict=True):
                if first is not None:
                    held, _, digest = first.decode().partition("|")
                    if digest != job.digest:
                        i = jobs.index(job)
                        rule = f"{job.key!r} was used for a different request (job {held})"
                        raise InvalidRequest([(f"requests.{i}.idempotency_key", rule)])

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
        owed: dict[str, str | None] = {f: getattr(rec, f.value) for f in carried}
        owed[JobField.BUILTIN_TOOLS] = rec.builtin_tools  # and so does its builtin_tools option
        owed[JobField.TENANT] = rec.tenant
        extra = {JobField.RETRY_OF: job_id, **{f: v for f, v in owed.items() if v}}
        new_id = self._enqueue(_Job(envelope, {**_record(envelope), **extra}))
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

    def _enqueue(self, job: _Job) -> str:
        # The record (and the job's place in the active index, which owns it until the job ends)
        # exists before the message does, so a worker always finds it.
        tenant = job.record[JobField.TENANT]
        if job.idem:
            (first,) = self._claim([job])
            if first:
                return self._existing(first.decode(), job)
        if self._direct is not None:
            self._write_and_push([job], tenant)
            return job.id
        with self.redis.pipeline(transaction=False) as pipe:
            self._write(pipe, [job], tenant)
            pipe.execute()
        self._send(job.envelope, job.idem, tenant)
        # Sent: from now on the sweeper looks for its message before re-sending it (worker/sweeper.py).
        self.mark(job.id, JobField.SENT, "1")
        return job.id

    def _enqueue_bulk(self, jobs: list[_Job], tenant: str, offset: int) -> list[str]:
        """Enqueue ``jobs`` (``requests[offset:]`` of a ``submit_many``); returns their ids, a key's first
        job's id where a key was taken."""
        keyed = [j for j in jobs if j.idem]
        taken: dict[str, str] = {}  # job id -> "<id>|<digest>" its key already named
        for job, first in zip(keyed, self._claim(keyed) if keyed else [], strict=True):
            # Its own id: a retried call (NOSCRIPT on another shard) that had recorded it already.
            if first and first.decode().partition("|")[0] != job.id:
                taken[job.id] = first.decode()
        new = [j for j in jobs if j.id not in taken]
        for i, job in enumerate(jobs):
            held, _, digest = taken.get(job.id, "|").partition("|")
            if held and digest != job.digest:  # a concurrent submit took the key first, for another request
                self._forget_jobs([j for j in new if j.idem])
                rule = f"{job.key!r} was used for a different request (job {held})"
                raise InvalidRequest([(f"requests.{offset + i}.idempotency_key", rule)])
        if self._direct is not None:
            self._write_and_push(new, tenant)
        elif new:
            self._write_and_publish(new, tenant)
        return self._first_jobs(jobs, taken, new) if taken else [job.id for job in jobs]

    def _first_jobs(self, jobs: Sequence[_Job], taken: Mapping[str, str], new: Sequence[_Job]) -> list[str]:
        """The jobs' ids, a taken key's first job's in its place: once that job is sure to be sent
        (``_existing``); at once when this call just sent it (the key twice in one call), or its record
        says it was sent."""
        ids = {job.id: taken[job.id].partition("|")[0] for job in jobs if job.id in taken}
        sent_now = {j.id for j in new}
        check = [job for job in jobs if job.id in taken and ids[job.id] not in sent_now]
        with self.redis.pipeline(transaction=False) as pipe:
            for job in check:
                pipe.hmget(self.keys.job(ids[job.id]), [JobField.STATUS, JobField.SENT])
            for job, (status, sent) in zip(check, pipe.execute() if check else [], strict=True):
                if status is None or (not sent and status == JobStatus.QUEUED.encode()):
                    ids[job.id] = self._existing(taken[job.id], job)
        return [ids.get(job.id, job.id) for job in jobs]

    def _write_and_publish(self, jobs: Sequence[_Job], tenant: str) -> None:
        """A broker apart: the records and index entries in one pipeline, the messages through Celery, then
        the ``sent`` marks."""
        with self.redis.pipeline(transaction=False) as pipe:
            self._write(pipe, jobs, tenant)
            pipe.execute()
        try:
            # kombu's producer batch buffers the queue pushes into one Redis pipeline (other brokers: one by one).
            with self._celery.producer_or_acquire() as producer, producer.batch(max_size=BULK_CHUNK):
                for job in jobs:
                    send_envelope(self._celery, self.settings, job.envelope, producer=producer, tenant=tenant)
        except Exception:
            self._forget_jobs(jobs)
            raise
        self._pipelined(self._set_field, [([self.keys.job(j.id)], [JobField.SENT, "1"]) for j in jobs])

    def _claim(self, jobs: Sequence[_Job]) -> list[Any]:
        """IDEMPOTENCY_LUA for each keyed job, pipelined: "" where it recorded the job, else what the key holds."""
        calls = []
        for job in jobs:
            flat = [x for kv in job.record.items() for x in kv]
            keys = [job.idem, self.keys.job(job.id), self.keys.active_for(job.id)]
            calls.append((keys, [job.id, job.digest, repr(job.envelope.enqueued_at), *flat]))
        return self._pipelined(self._claim_key, calls)

    def _write(
        self, pipe: redis.client.Pipeline | Commands, jobs: Sequence[_Job], tenant: str, sent: bool = False
    ) -> None:
        """Queue on ``pipe`` the records and active-index entries of the jobs without a key (the claim
        wrote the others'), and every job's recent-jobs entries; ``sent``: the records with their sent
        mark (the caller's script call pushes their messages too: ``push_commands``)."""
        plain = [j for j in jobs if not j.idem]
        for job in plain:
            record = {**job.record, JobField.SENT: "1"} if sent else job.record
            pipe.hset(self.keys.job(job.id), mapping=record)  # type: ignore[arg-type]
        for active, enqueued in _by_group([j.envelope for j in plain], self.keys.active_in).items():
            pipe.zadd(active, enqueued)
        self._remember(pipe, {j.id: j.envelope.enqueued_at for j in jobs}, tenant)

    def _write_and_push(self, jobs: Sequence[_Job], tenant: str) -> None:
        """The broker is this Redis: in one script call, the messages, records (marked sent) and index
        entries (``push_commands``). All or nothing (a Redis out of memory refuses the lot); a push
        refused anyway (the list is not a list) forgets the jobs, as a refused publish does."""
        assert self._direct is not None
        if not jobs:
            return
        try:
            self._commands(args=self.push_commands(jobs))
        except Exception:
            self._forget_jobs(jobs)
            raise

    def _forget_jobs(self, jobs: Sequence[_Job]) -> None:
        calls = [
            ([self.keys.job(j.id), self.keys.active_for(j.id), *([j.idem] if j.idem else [])], [j.id]) for j in jobs
        ]
        if calls:
            self._pipelined(self._forget, calls)

    def _pipelined(self, script: Script, calls: Sequence[tuple[list[str], list[str]]]) -> list[Any]:
        """``script`` once per ``(keys, args)``, in one pipeline (on a Redis Cluster, one per shard); their answers.

        EVALSHA by hand: redis-py's cluster pipelines refuse Script objects. A NOSCRIPT (a Redis
        restarted since, or a shard that never saw the script) loads it everywhere and runs them again:
        a call answered NOSCRIPT ran nothing, and these scripts are idempotent besides.
        """
        for attempt in (1, 2):
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for keys, args in calls:
                        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
                    return list(pipe.execute())
            except NoScriptError:
                if attempt == 2:
                    raise
                self.redis.script_load(script.script)
        raise AssertionError("unreachable")

    def _remember(self, pipe: redis.client.Pipeline | Commands, enqueued: Mapping[str, float], tenant: str) -> None:
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

    def _existing(self, stored: str, job: _Job) -> str:
        job_id, _, first_digest = stored.partition("|")
        if first_digest != job.digest:
            raise InvalidRequest([("idempotency_key", f"{job.key!r} was used for a different request (job {job_id})")])
        if self.record(job_id) is None:
            # The key outlived its job (a key written before keys were tied to their record's life):
            # release it and submit afresh, rather than hand back an id that answers "not found".
            self._forget(keys=[self.keys.job(job_id), self.keys.active_for(job_id), job.idem], args=[job_id])
            return self._enqueue(job)
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


def _owed_item(item: SubmitItem, options: JobOptions, config: TenantConfig) -> dict[str, str]:
    """``_owed`` for one ``submit_many`` job: its own callback options, the call's where it has none."""
    own: JobOptions = {
        "webhook": item.webhook or options.get("webhook"),
        "webhook_events": item.webhook_events if item.webhook_events is not None else options.get("webhook_events"),
        "on_done": item.on_done or options.get("on_done"),
        "on_done_queue": item.on_done_queue or options.get("on_done_queue"),
    }
    return _owed(own, config)


def _has_callbacks(item: SubmitItem) -> bool:
    return any(x is not None for x in (item.webhook, item.webhook_events, item.on_done, item.on_done_queue))


def _check_key(key: object, field: str) -> None:
    if key is not None and not (isinstance(key, str) and 0 < len(key) <= 255):
        raise InvalidRequest([(field, "must be a non-empty string of at most 255 characters")])


def _options(builtin_tools: object, n: int | None, field: str = "builtin_tools") -> dict[str, str]:
    """The record fields of the options that travel beside the request (moonq/models.py)."""
    mode = check_builtin_tools(builtin_tools, n, field)
    return {JobField.BUILTIN_TOOLS: mode} if mode is not None else {}


def _request_digest(envelope: JobEnvelope) -> str:
    body = json.dumps({"request": envelope.request, "priority": envelope.priority}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()
