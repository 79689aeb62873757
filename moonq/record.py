"""The job record: one Redis hash per job (``P:job:<id>``), its fields, its states, its readers.

This module owns the record. Python code names a field as ``JobField.STATUS`` and reads a
record with ``JobRecord.from_redis``; a Lua script that touches the hash is written with
``$field`` and ``$status`` placeholders and passed through ``record_lua``, which puts the
names in (and refuses an unknown placeholder when the module is imported). Renaming a field
is one edit here.

Fields (all stored as strings; written by whom):

    status            queued | running | retrying | succeeded | failed | cancelled
                      (producer at submit; worker from its claim to the end; producer on cancel-while-queued)
    model             the request's model, for listings and metrics labels (producer)
    priority          0 (most urgent) to 9 (producer)
    envelope          the task message as JSON, to resend or retry the job (producer)
    enqueued_at       unix seconds at submit (producer)
    sent              "1" once the broker accepted the message (producer, idempotent submits only)
    seq               the last event sequence number written (every event-log append)
    attempt           attempts started so far (worker's claim)
    owner             token of the delivery that owns the job now; fences stale writers (worker)
    heartbeat_at      Redis time in ms of the owner's last beat (worker's keepalive)
    cancel_requested  "1" once someone asked to cancel (producer)
    started_at        unix seconds of the first claim (worker)
    finished_at       unix seconds of the end (whoever ended it)
    result            the completion as JSON (worker, on success)
    error             ``{type, message, status}`` as JSON (worker, on failure)
    retry_of          the failed job this one re-runs (producer's ``retry``)
    tenant            the tenant the job belongs to (producer; moonq/tenants.py); absent = ``default``
    idem_key          the Redis key of the job's idempotency key, if it has one (producer); the key
                      lives as long as the record and expires with it (moonq/eventlog.py)
    webhook           the URL to POST the job's outcome to when it ends (producer; docs/webhooks.md)
    webhook_events    comma-separated progress events also sent to that URL: ``started``, ``retry`` (producer)
    on_done           a Celery task name to send the outcome to when the job ends (producer)
    on_done_queue     the queue of that task; empty = ``celery`` (producer)
    builtin_tools     ``auto``: the worker runs builtin tool rounds itself (producer; docs/moonshot-api.md §6)

Lifetime: a record has no TTL while its job is active; it is owned by the active-jobs index
(``P:active``, see moonq/keys.py), which the fleet's sweeper watches so that no active job is left
without a message or a live owner. The write that ends the job gives the record, its replay log
and its idempotency key their TTL (``result_ttl_s``) and takes the job out of the index.

Readers ignore fields they do not know, so a newer writer never breaks an older reader.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from enum import StrEnum
from string import Template
from typing import Any

from pydantic import BaseModel, ConfigDict

# The tenant of a job recorded without one (before tenants, or without a tenants file).
DEFAULT_TENANT = "default"


class JobStatus(StrEnum):
    """A job's state. ``queued`` -> ``running`` (<-> ``retrying``) -> one terminal state."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES: frozenset[str] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class JobField(StrEnum):
    """The record's field names (see the module docstring for what each holds)."""

    STATUS = "status"
    MODEL = "model"
    PRIORITY = "priority"
    ENVELOPE = "envelope"
    ENQUEUED_AT = "enqueued_at"
    SENT = "sent"
    SEQ = "seq"
    ATTEMPT = "attempt"
    OWNER = "owner"
    HEARTBEAT_AT = "heartbeat_at"
    CANCEL_REQUESTED = "cancel_requested"
    STARTED_AT = "started_at"
    FINISHED_AT = "finished_at"
    RESULT = "result"
    ERROR = "error"
    RETRY_OF = "retry_of"
    TENANT = "tenant"
    IDEM_KEY = "idem_key"
    WEBHOOK = "webhook"
    WEBHOOK_EVENTS = "webhook_events"
    ON_DONE = "on_done"
    ON_DONE_QUEUE = "on_done_queue"
    BUILTIN_TOOLS = "builtin_tools"


def _lua_names() -> dict[str, str]:
    names = {f.value: f"'{f.value}'" for f in JobField}
    names |= {s.value: f"'{s.value}'" for s in JobStatus}  # 'status' is both: the field name, same text
    # A Lua expression: is the string in the variable ``status`` a terminal status?
    terminal = " or ".join(f"status == '{s}'" for s in sorted(TERMINAL_STATUSES))
    names["is_terminal"] = f"({terminal})"
    return names


LUA_NAMES = _lua_names()


def record_lua(script: str) -> str:
    """``script`` with ``$field`` / ``$status`` placeholders replaced by quoted Lua strings.

    ``$is_terminal`` becomes an expression testing a local variable named ``status``.

    Raises:
        KeyError: the script names a placeholder that is neither a field nor a status.
    """
    return Template(script).substitute(LUA_NAMES)


def _text(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def decode_hash(raw: Mapping[Any, Any] | None) -> dict[str, str]:
    """A hash as redis-py returns it (bytes or str) as ``{str: str}``; ``{}`` for a missing key."""
    return {_text(k): _text(v) for k, v in (raw or {}).items()}


def fields_to_read(fields: Iterable[str] | None) -> list[str] | None:
    """The fields a reader asking for ``fields`` reads: those, plus what says whether it may see the job
    (status and tenant); None (all of them, the request too) when it asks for none in particular."""
    return None if fields is None else list(dict.fromkeys([JobField.STATUS, JobField.TENANT, *fields]))


def picked(names: list[str], values: Iterable[Any]) -> dict[str, str]:
    """An ``HMGET`` of ``names`` as ``{name: value}``, decoded, without the fields the record lacks."""
    return decode_hash({k: v for k, v in zip(names, values, strict=True) if v is not None})


# Every field but the envelope, which holds the whole request (up to 100 MB): what a state read needs.
STATE_FIELDS: tuple[str, ...] = tuple(f.value for f in JobField if f is not JobField.ENVELOPE)


def visible(fields: Mapping[str, str], tenant: str | None) -> bool:
    """Whether a record (decoded fields) is one a reader scoped to ``tenant`` may see (None: any)."""
    return tenant is None or (fields.get(JobField.TENANT) or DEFAULT_TENANT) == tenant


class JobRecord(BaseModel):
    """A job record as read from Redis: typed, and tolerant of fields it does not know."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    status: JobStatus
    model: str = ""
    priority: int | None = None
    envelope: str | None = None
    enqueued_at: float | None = None
    sent: bool = False
    seq: int = 0
    attempt: int = 0
    owner: str = ""
    heartbeat_at: float | None = None
    cancel_requested: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    result: str | None = None  # JSON text; ``completion()`` parses it
    error: str | None = None  # JSON text; ``error_info()`` parses it
    retry_of: str | None = None
    tenant: str = DEFAULT_TENANT
    idem_key: str | None = None
    webhook: str | None = None
    webhook_events: str | None = None
    on_done: str | None = None
    on_done_queue: str | None = None
    builtin_tools: str | None = None

    @classmethod
    def from_redis(cls, raw: Mapping[Any, Any] | None) -> JobRecord | None:
        """The record in an ``HGETALL`` reply, or None when the job is unknown (or expired).

        An empty value counts as a missing field (a requeued job's ``owner`` is cleared to ``""``),
        so a hash without a non-empty ``status`` is no record.
        """
        fields = {k: v for k, v in decode_hash(raw).items() if v != ""}
        if JobField.STATUS not in fields:
            return None
        return cls.model_validate(fields)

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    def error_info(self) -> dict[str, Any]:
        """The failure's ``{type, message, status}`` (empty if the job did not fail)."""
        return dict(json.loads(self.error)) if self.error else {}

    def result_data(self) -> dict[str, Any] | None:
        """The completion as a dict (None unless the job succeeded)."""
        return dict(json.loads(self.result)) if self.result else None


# HSET of one field, only on a record that exists: a late write to a job whose record has expired
# must not make a new record with that one field and no TTL, which nothing would ever delete.
# KEYS[1] job hash; ARGV[1] field, ARGV[2] value. Returns 1 if written, 0 if the record is gone.
SET_IF_EXISTS_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


def new_record(
    *, model: str, enqueued_at: float, priority: int, envelope_json: str, tenant: str = DEFAULT_TENANT
) -> dict[str, str]:
    """The fields of a new job's record, written before its message is sent."""
    return {
        JobField.STATUS: JobStatus.QUEUED,
        JobField.TENANT: tenant,
        JobField.MODEL: model,
        JobField.ENQUEUED_AT: repr(enqueued_at),
        JobField.PRIORITY: str(priority),
        JobField.SEQ: "0",
        JobField.ENVELOPE: envelope_json,
    }
