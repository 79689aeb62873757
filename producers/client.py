"""The Python API a producing service uses: submit, follow, wait, cancel."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from moonq.broker import message_priority, producer_app
from moonq.errors import InvalidRequest, JobCancelled, JobFailed, JobNotFound, JobTimeout
from moonq.eventlog import APPEND_LUA, append_args, event_body, follow, is_terminal, job_record
from moonq.settings import ClientSettings
from moonq.wire import (
    DEFAULT_PRIORITY,
    TASK_NAME,
    TERMINAL_EVENTS,
    ChatCompletion,
    ChatRequest,
    Event,
    JobEnvelope,
    check_priority,
    validate_request,
)

# HSET on a job record that may have expired meanwhile: without the check, it would make a new
# record with only that field and no TTL, which nothing would ever delete.
SET_IF_EXISTS_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


class Client:
    """A connection to one moonq queue.

    Args:
        redis_url: overrides ``REDIS_URL``.
        settings: full settings; by default read from the environment.
    """

    def __init__(self, redis_url: str | None = None, *, settings: ClientSettings | None = None) -> None:
        if settings is None:
            settings = ClientSettings(redis_url=redis_url) if redis_url else ClientSettings()
        self.settings = settings
        self.keys = settings.keys
        self.redis = redis.Redis.from_url(settings.redis_url)
        self._append = self.redis.register_script(APPEND_LUA)
        self._claim_key = self.redis.register_script(IDEMPOTENCY_LUA)
        self._set_field = self.redis.register_script(SET_IF_EXISTS_LUA)
        self._celery = producer_app(settings)

    def submit(
        self,
        request: dict[str, Any] | ChatRequest,
        *,
        priority: int = DEFAULT_PRIORITY,
        idempotency_key: str | None = None,
    ) -> Job:
        """Validate ``request`` and enqueue it as a new job.

        Args:
            request: a chat-completions body (dict) or a ``ChatRequest``.
            priority: 0 (most urgent) to 9; orders both the queue and the wait for rate-limit capacity.
            idempotency_key: submitting the same key again within ``result_ttl_s`` returns the first
                job instead of running the request again.

        Raises:
            InvalidRequest: the request or an option broke a documented rule (or the idempotency key
                was used before with a different request); nothing was enqueued.
        """
        priority = check_priority(priority)
        if idempotency_key is not None and not (isinstance(idempotency_key, str) and 0 < len(idempotency_key) <= 255):
            raise InvalidRequest([("idempotency_key", "must be a non-empty string of at most 255 characters")])
        payload = validate_request(request).to_payload()
        envelope = JobEnvelope(job_id=str(uuid.uuid4()), request=payload, priority=priority)
        return self._enqueue(envelope, {}, idempotency_key)

    def _enqueue(self, envelope: JobEnvelope, extra: dict[str, str], idempotency_key: str | None = None) -> Job:
        job_key = self.keys.job(envelope.job_id)
        # The record exists before the message does, so a worker always finds it.
        record = {**_record(envelope), **extra}
        if idempotency_key is None:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(job_key, mapping=record)
                pipe.expire(job_key, self.settings.result_ttl_s)
                pipe.execute()
        else:
            digest = _request_digest(envelope)
            flat = [x for kv in record.items() for x in kv]
            keys = [self.keys.idempotency(idempotency_key), job_key]
            first = self._claim_key(keys=keys, args=[envelope.job_id, digest, self.settings.result_ttl_s, *flat])
            if first:
                return self._existing(first.decode(), digest, idempotency_key)
        self._send(envelope)
        if idempotency_key is not None:
            self._mark(envelope.job_id, "sent", "1")
        return Job(self, envelope.job_id)

    def submit_many(
        self, requests: Iterable[dict[str, Any] | ChatRequest], *, priority: int = DEFAULT_PRIORITY
    ) -> list[Job]:
        """Validate every request, then enqueue them all with pipelined Redis writes.

        All or nothing for validation: one bad request raises ``InvalidRequest`` naming it
        (``requests.3.messages.0.content: …``) and nothing is enqueued.
        """
        priority = check_priority(priority)
        envelopes = []
        for i, request in enumerate(requests):
            try:
                payload = validate_request(request).to_payload()
            except InvalidRequest as err:
                raise InvalidRequest([(f"requests.{i}.{field}", rule) for field, rule in err.errors]) from None
            envelopes.append(JobEnvelope(job_id=str(uuid.uuid4()), request=payload, priority=priority))
        for start in range(0, len(envelopes), BULK_CHUNK):
            self._enqueue_bulk(envelopes[start : start + BULK_CHUNK])
        return [Job(self, e.job_id) for e in envelopes]

    def _enqueue_bulk(self, envelopes: list[JobEnvelope]) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for envelope in envelopes:
                key = self.keys.job(envelope.job_id)
                pipe.hset(key, mapping=_record(envelope))
                pipe.expire(key, self.settings.result_ttl_s)
            pipe.execute()
        try:
            # kombu's producer batch buffers the queue pushes into one Redis pipeline (other brokers: one by one).
            with self._celery.producer_or_acquire() as producer, producer.batch(max_size=BULK_CHUNK):
                for envelope in envelopes:
                    self._celery.send_task(
                        TASK_NAME,
                        args=[envelope.model_dump(mode="json")],
                        task_id=envelope.job_id,
                        queue=self.settings.queue,
                        priority=message_priority(self.settings, envelope.priority),
                        producer=producer,
                        **_short_reprs(envelope),
                    )
        except Exception:
            self.redis.delete(*(self.keys.job(e.job_id) for e in envelopes))
            raise

    def _send(self, envelope: JobEnvelope) -> None:
        try:
            self._celery.send_task(
                TASK_NAME,
                args=[envelope.model_dump(mode="json")],
                task_id=envelope.job_id,
                queue=self.settings.queue,
                priority=message_priority(self.settings, envelope.priority),
                **_short_reprs(envelope),
            )
        except Exception:
            self.redis.delete(self.keys.job(envelope.job_id))
            raise

    def _existing(self, stored: str, digest: str, key: str) -> Job:
        job_id, _, first_digest = stored.partition("|")
        if first_digest != digest:
            raise InvalidRequest([("idempotency_key", f"{key!r} was used for a different request (job {job_id})")])
        job = Job(self, job_id)
        # Recorded but not (yet) sent: the first submitter is sending it now, or died before it could.
        # Wait until it is sent or RESEND_AFTER_S old, then send it ourselves; returning without
        # either could leave the job queued forever. (A duplicate message is harmless: the claim runs
        # a job once.)
        while True:
            rec = job_record(self.redis, self.keys, job_id)
            if rec.get("status") != "queued" or rec.get("sent") == "1":
                return job
            if time.time() - float(rec.get("enqueued_at") or 0) > RESEND_AFTER_S:
                self._send(JobEnvelope.model_validate_json(rec["envelope"]))
                self._mark(job_id, "sent", "1")
                return job
            time.sleep(0.1)

    def _mark(self, job_id: str, field: str, value: str) -> bool:
        """Set one field of a job's record, only while the record exists (never a record without a TTL)."""
        return bool(self._set_field(keys=[self.keys.job(job_id)], args=[field, value]))

    def failed(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent dead letters: jobs that ended ``failed``, newest first."""
        out = []
        entries: list[tuple[bytes, float]] = self.redis.zrevrange(  # type: ignore[assignment]
            self.keys.failed, 0, limit - 1, withscores=True
        )
        for raw_id, finished_at in entries:
            job_id = raw_id.decode()
            rec = job_record(self.redis, self.keys, job_id)
            if rec.get("status") == "failed":  # not expired, not re-run under the same id
                error = json.loads(rec.get("error") or "{}")
                out.append(
                    {
                        "id": job_id,
                        "model": rec.get("model"),
                        "finished_at": finished_at,
                        "attempts": int(rec.get("attempt") or 0),
                        "error": error,
                    }
                )
        return out

    def retry(self, job_id: str) -> Job:
        """Run a failed (or cancelled) job's request again, as a new job; returns the new job.

        The old job keeps its outcome and its events (each job ends exactly once); the new record
        names it in ``retry_of``.
        """
        rec = self.job(job_id).record()
        if rec["status"] not in ("failed", "cancelled"):
            raise InvalidRequest(
                [("job", f"only a failed or cancelled job can be retried (job {job_id} is {rec['status']})")]
            )
        old = JobEnvelope.model_validate_json(rec["envelope"])
        envelope = JobEnvelope(job_id=str(uuid.uuid4()), request=old.request, priority=old.priority)
        job = self._enqueue(envelope, {"retry_of": job_id})
        self.redis.zrem(self.keys.failed, job_id)
        return job

    def job(self, job_id: str) -> Job:
        """A handle for an existing job (not checked until used)."""
        return Job(self, job_id)

    def close(self) -> None:
        self.redis.close()
        self._celery.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# KEYS[1] idempotency key, KEYS[2] job hash. ARGV[1] job id, ARGV[2] request digest, ARGV[3] ttl_s,
# ARGV[4..] job record field/value pairs. Records the job under the key unless the key is taken;
# returns "" when it recorded, else the stored "<job id>|<digest>" of the first submission.
IDEMPOTENCY_LUA = """
local first = redis.call('GET', KEYS[1])
if first then return first end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'EX', tonumber(ARGV[3]))
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return ''
"""
# A job recorded under an idempotency key but never sent (its submitter died) is sent again by a
# later submitter once it is this old.
RESEND_AFTER_S = 5.0


BULK_CHUNK = 1000


def _record(envelope: JobEnvelope) -> dict[Any, Any]:
    """A new job's record, written before its message is sent."""
    return {
        "status": "queued",
        "model": str(envelope.request["model"]),
        "enqueued_at": repr(envelope.enqueued_at),
        "priority": envelope.priority,
        "seq": 0,
        "envelope": envelope.model_dump_json(),
    }


def _short_reprs(envelope: JobEnvelope) -> dict[str, str]:
    # Celery copies a repr of the arguments into the message headers for its logs and monitors.
    # The arguments are a whole prompt: keep it out of headers (and skip the costly repr).
    return {"argsrepr": f"(<job {envelope.job_id} {envelope.request.get('model')}>,)", "kwargsrepr": "{}"}


def _request_digest(envelope: JobEnvelope) -> str:
    body = json.dumps({"request": envelope.request, "priority": envelope.priority}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def outcome_of(job_id: str, rec: dict[str, str]) -> ChatCompletion:
    """The completion of an ended job's record, or the exception its ending calls for."""
    if rec["status"] == "succeeded":
        return ChatCompletion.model_validate_json(rec["result"])
    if rec["status"] == "cancelled":
        raise JobCancelled(job_id, {"type": "cancelled", "message": "the job was cancelled", "status": None})
    raise JobFailed(job_id, json.loads(rec.get("error") or "{}"))


def _is_terminal_message(data: bytes) -> bool:
    return json.loads(data).get("type") in TERMINAL_EVENTS


class Job:
    """A handle on one job; cheap to create, every method reads Redis afresh."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"<Job {self.id}>"

    def record(self) -> dict[str, str]:
        rec = job_record(self.client.redis, self.client.keys, self.id)
        if not rec:
            raise JobNotFound(self.id)
        return rec

    def status(self) -> str:
        """``queued``, ``running``, ``retrying``, ``succeeded``, ``failed`` or ``cancelled``."""
        return self.record()["status"]

    def events(self, *, after_seq: int = 0) -> Iterator[Event]:
        """Every event from the first (replayed), then live; ends after the terminal one."""
        self.record()  # JobNotFound rather than an empty iterator
        return follow(self.client.redis, self.client.keys, self.id, after_seq=after_seq)

    def result(self, timeout: float | None = None) -> ChatCompletion:
        """Wait for the job to end and return its completion.

        Raises:
            JobFailed: the job ended failed (``.error`` has type, message, status).
            JobCancelled: the job was cancelled.
            JobTimeout: ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pubsub = self.client.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.subscribe(self.client.keys.events(self.id))
        try:
            while True:
                rec = self.record()
                if is_terminal(rec["status"]):
                    return outcome_of(self.id, rec)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise JobTimeout(f"job {self.id} still {rec['status']} after {timeout}s")
                # Only a terminal event sends us back to the record (deltas are many); the poll bound
                # covers a lost message.
                msg = pubsub.get_message(timeout=min(1.0, left) if left is not None else 1.0)
                while msg is not None and not _is_terminal_message(msg["data"]):
                    msg = pubsub.get_message(timeout=min(1.0, left) if left is not None else 1.0)
        finally:
            pubsub.close()

    def cancel(self) -> bool:
        """Stop the job: a queued one never runs, a running one is aborted within about a second.

        Returns False if the job had already ended.
        """
        r = self.client.redis
        keys = self.client.keys
        rec = self.record()
        if is_terminal(rec["status"]):
            return False
        self.client._mark(self.id, "cancel_requested", "1")
        # Still queued: end it here and now; the worker that later receives it will skip it.
        k, argv = append_args(
            keys,
            self.id,
            [event_body(self.id, "cancelled")],
            ttl_s=self.client.settings.result_ttl_s,
            require_status="queued",
            fields={"status": "cancelled", "finished_at": repr(time.time())},
        )
        if not self.client._append(keys=k, args=argv):
            # Running (or retrying): the node running it aborts the stream and ends it cancelled.
            r.publish(keys.cancel, self.id)
        return True
