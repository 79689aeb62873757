"""The Python API a producing service uses: submit, follow, wait, cancel."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis

from producers.broker import producer_app
from producers.errors import JobCancelled, JobFailed, JobNotFound, JobTimeout
from producers.eventlog import APPEND_LUA, append_args, event_body, follow, is_terminal, job_record
from producers.settings import ClientSettings
from producers.wire import TASK_NAME, ChatCompletion, ChatRequest, Event, JobEnvelope, validate_request


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
        self._celery = producer_app(settings)

    def submit(self, request: dict[str, Any] | ChatRequest) -> Job:
        """Validate ``request`` and enqueue it as a new job.

        Raises:
            InvalidRequest: the request broke a documented rule; nothing was enqueued.
        """
        payload = validate_request(request).to_payload()
        envelope = JobEnvelope(job_id=str(uuid.uuid4()), request=payload)
        job_key = self.keys.job(envelope.job_id)
        # The record exists before the message does, so a worker always finds it.
        self.redis.hset(
            job_key,
            mapping={
                "status": "queued",
                "model": payload["model"],
                "enqueued_at": repr(envelope.enqueued_at),
                "seq": 0,
                "envelope": envelope.model_dump_json(),
            },
        )
        self.redis.expire(job_key, self.settings.result_ttl_s)
        try:
            self._celery.send_task(
                TASK_NAME, args=[envelope.model_dump(mode="json")], task_id=envelope.job_id, queue=self.settings.queue
            )
        except Exception:
            self.redis.delete(job_key)
            raise
        return Job(self, envelope.job_id)

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
                    return self._outcome(rec)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise JobTimeout(f"job {self.id} still {rec['status']} after {timeout}s")
                # Any event wakes us to re-read the record; the poll bound covers a lost message.
                pubsub.get_message(timeout=min(1.0, left) if left is not None else 1.0)
                while pubsub.get_message(timeout=0) is not None:
                    pass
        finally:
            pubsub.close()

    def _outcome(self, rec: dict[str, str]) -> ChatCompletion:
        if rec["status"] == "succeeded":
            return ChatCompletion.model_validate_json(rec["result"])
        if rec["status"] == "cancelled":
            raise JobCancelled(self.id, {"type": "cancelled", "message": "the job was cancelled", "status": None})
        raise JobFailed(self.id, json.loads(rec.get("error") or "{}"))

    def cancel(self) -> bool:
        """Stop the job: a queued one never runs, a running one is aborted within about a second.

        Returns False if the job had already ended.
        """
        r = self.client.redis
        keys = self.client.keys
        rec = self.record()
        if is_terminal(rec["status"]):
            return False
        r.hset(keys.job(self.id), "cancel_requested", "1")
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
