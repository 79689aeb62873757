"""The writes a producer makes: submit, submit many, retry, cancel, list dead letters.

Synchronous (Celery's producer is), and shared by both clients: ``Client`` calls it directly,
``AsyncClient`` from a worker thread (``asyncio.to_thread``). It deals in job ids; the clients
wrap them in their ``Job`` / ``AsyncJob`` handles.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from moonq.broker import message_priority, producer_app
from moonq.errors import InvalidRequest, JobNotFound
from moonq.eventlog import APPEND_LUA, append_args, event_body
from moonq.record import JobField, JobRecord, JobStatus, new_record
from moonq.settings import ClientSettings
from moonq.wire import TASK_NAME, ChatRequest, JobEnvelope, check_priority, validate_request

# HSET on a job record that may have expired meanwhile: without the check, it would make a new
# record with only that field and no TTL, which nothing would ever delete.
SET_IF_EXISTS_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""

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
# Jobs per pipelined batch of ``submit_many``.
BULK_CHUNK = 1000


class Submitter:
    """Enqueues and ends jobs on one queue, through ``client`` (Redis) and a Celery producer."""

    def __init__(self, settings: ClientSettings, client: redis.Redis) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.redis = client
        self._append = client.register_script(APPEND_LUA)
        self._claim_key = client.register_script(IDEMPOTENCY_LUA)
        self._set_field = client.register_script(SET_IF_EXISTS_LUA)
        self._celery = producer_app(settings)

    def record(self, job_id: str) -> JobRecord | None:
        """The job's record, or None when it is unknown (or expired)."""
        return JobRecord.from_redis(self.redis.hgetall(self.keys.job(job_id)))

    def submit(
        self, request: dict[str, Any] | ChatRequest, *, priority: int, idempotency_key: str | None = None
    ) -> str:
        """As ``Client.submit``; returns the job id."""
        priority = check_priority(priority)
        if idempotency_key is not None and not (isinstance(idempotency_key, str) and 0 < len(idempotency_key) <= 255):
            raise InvalidRequest([("idempotency_key", "must be a non-empty string of at most 255 characters")])
        payload = validate_request(request).to_payload()
        envelope = JobEnvelope(job_id=str(uuid.uuid4()), request=payload, priority=priority)
        return self._enqueue(envelope, {}, idempotency_key)

    def submit_many(self, requests: Iterable[dict[str, Any] | ChatRequest], *, priority: int) -> list[str]:
        """As ``Client.submit_many``; returns the job ids, in request order."""
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
        return [e.job_id for e in envelopes]

    def retry(self, job_id: str) -> str:
        """As ``Client.retry``; returns the new job's id."""
        rec = self.record(job_id)
        if rec is None:
            raise JobNotFound(job_id)
        if rec.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise InvalidRequest(
                [("job", f"only a failed or cancelled job can be retried (job {job_id} is {rec.status.value})")]
            )
        old = JobEnvelope.model_validate_json(rec.envelope or "")
        envelope = JobEnvelope(job_id=str(uuid.uuid4()), request=old.request, priority=old.priority)
        new_id = self._enqueue(envelope, {JobField.RETRY_OF: job_id})
        self.redis.zrem(self.keys.failed, job_id)
        return new_id

    def failed(self, limit: int) -> list[dict[str, Any]]:
        """As ``Client.failed``."""
        out = []
        entries: list[tuple[bytes, float]] = self.redis.zrevrange(  # type: ignore[assignment]
            self.keys.failed, 0, limit - 1, withscores=True
        )
        for raw_id, finished_at in entries:
            job_id = raw_id.decode()
            rec = self.record(job_id)
            if rec is not None and rec.status is JobStatus.FAILED:  # not expired, not re-run under the same id
                out.append(
                    {
                        "id": job_id,
                        "model": rec.model or None,
                        "finished_at": finished_at,
                        "attempts": rec.attempt,
                        "error": rec.error_info(),
                    }
                )
        return out

    def cancel(self, job_id: str) -> bool:
        """As ``Job.cancel``: False if the job had already ended.

        Raises:
            JobNotFound: no such job.
        """
        rec = self.record(job_id)
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
        )
        if not self._append(keys=keys, args=argv):
            # Running (or retrying): the node running it aborts the stream and ends it cancelled.
            self.redis.publish(self.keys.cancel, job_id)
        return True

    def mark(self, job_id: str, field: JobField | str, value: str) -> bool:
        """Set one field of a job's record, only while the record exists (never a record without a TTL)."""
        return bool(self._set_field(keys=[self.keys.job(job_id)], args=[field, value]))

    def close(self) -> None:
        self._celery.close()

    def _enqueue(self, envelope: JobEnvelope, extra: Mapping[str, str], idempotency_key: str | None = None) -> str:
        job_key = self.keys.job(envelope.job_id)
        # The record exists before the message does, so a worker always finds it.
        record = {**_record(envelope), **extra}
        if idempotency_key is None:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(job_key, mapping=record)  # type: ignore[arg-type]
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
            self.mark(envelope.job_id, JobField.SENT, "1")
        return envelope.job_id

    def _enqueue_bulk(self, envelopes: list[JobEnvelope]) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for envelope in envelopes:
                key = self.keys.job(envelope.job_id)
                pipe.hset(key, mapping=_record(envelope))  # type: ignore[arg-type]
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

    def _existing(self, stored: str, digest: str, key: str) -> str:
        job_id, _, first_digest = stored.partition("|")
        if first_digest != digest:
            raise InvalidRequest([("idempotency_key", f"{key!r} was used for a different request (job {job_id})")])
        # Recorded but not (yet) sent: the first submitter is sending it now, or died before it could.
        # Wait until it is sent or RESEND_AFTER_S old, then send it ourselves; returning without
        # either could leave the job queued forever. (A duplicate message is harmless: the claim runs
        # a job once.)
        while True:
            rec = self.record(job_id)
            if rec is None or rec.status is not JobStatus.QUEUED or rec.sent:
                return job_id
            if time.time() - (rec.enqueued_at or 0.0) > RESEND_AFTER_S:
                self._send(JobEnvelope.model_validate_json(rec.envelope or ""))
                self.mark(job_id, JobField.SENT, "1")
                return job_id
            time.sleep(0.1)


def _record(envelope: JobEnvelope) -> dict[str, str]:
    """A new job's record, written before its message is sent."""
    return new_record(
        model=str(envelope.request["model"]),
        enqueued_at=envelope.enqueued_at,
        priority=envelope.priority,
        envelope_json=envelope.model_dump_json(),
    )


def _short_reprs(envelope: JobEnvelope) -> dict[str, str]:
    # Celery copies a repr of the arguments into the message headers for its logs and monitors.
    # The arguments are a whole prompt: keep it out of headers (and skip the costly repr).
    return {"argsrepr": f"(<job {envelope.job_id} {envelope.request.get('model')}>,)", "kwargsrepr": "{}"}


def _request_digest(envelope: JobEnvelope) -> str:
    body = json.dumps({"request": envelope.request, "priority": envelope.priority}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()
