"""The Python API a producing service uses: submit, follow, wait, cancel.

``Client`` is thread-safe: many threads may follow and wait on jobs of one client at once, and
share its one pub/sub connection (``producers/thread_fanout.py``). What following and waiting
decide is in ``producers/follow.py``, shared with ``AsyncClient``; the writes are in
``producers/submitter.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar, Unpack

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from moonq.errors import JobNotFound
from moonq.eventlog import parse_entries
from moonq.record import JobField, JobRecord, decode_hash, fields_to_read, picked, visible
from moonq.redisurl import sync_redis
from moonq.settings import ClientSettings
from moonq.wire import DEFAULT_PRIORITY, ChatCompletion, ChatRequest, Event
from producers.follow import Follower, ResultWait
from producers.submitter import RESEND_AFTER_S, JobOptions, SubmitItem, Submitter
from producers.thread_fanout import ThreadFanout

__all__ = ["RESEND_AFTER_S", "Client", "Job", "SubmitItem"]

T = TypeVar("T")


def _riding_out_restarts(read: Callable[[], T]) -> T:
    """``read()``, retried with backoff for about a minute while Redis is unreachable.

    Following and waiting are long-lived, so their reads ride out a Redis restart as
    ``AsyncClient``'s do (the same policy as moonq/connect.py); one-shot calls keep redis-py's
    few quick retries and fail fast.
    """
    retry = Retry(
        ExponentialWithJitterBackoff(base=0.1, cap=5.0),
        retries=20,
        supported_errors=(redis.ConnectionError, redis.TimeoutError, OSError),
    )
    return retry.call_with_retry(read, lambda _error: None)


class Client:
    """A connection to one moonq queue.

    Args:
        redis_url: overrides ``REDIS_URL``.
        settings: full settings; by default read from the environment.
        tenant: the tenant this client submits as and whose jobs it sees (another tenant's job id
            answers ``JobNotFound``, as an unknown one); None: submits need a per-call ``tenant=``
            when ``MOONQ_TENANTS_FILE`` configures tenants (else they go to ``default``), and every
            job is visible. A Python client holds Redis credentials: this scopes it, it does not
            police it (the gateway is the boundary, docs/tenants.md).
    """

    def __init__(
        self, redis_url: str | None = None, *, settings: ClientSettings | None = None, tenant: str | None = None
    ) -> None:
        if settings is None:
            settings = ClientSettings(redis_url=redis_url) if redis_url else ClientSettings()
        self.settings = settings
        self.tenant = tenant
        self.keys = settings.keys
        self.redis = sync_redis(settings.redis_url)
        # Every follower and waiter of this client, in any thread, shares one pub/sub connection.
        self.fanout = ThreadFanout(self.redis)
        self._submitter = Submitter(settings, self.redis)

    def submit(
        self,
        request: dict[str, Any] | ChatRequest,
        *,
        priority: int = DEFAULT_PRIORITY,
        idempotency_key: str | None = None,
        **options: Unpack[JobOptions],
    ) -> Job:
        """Validate ``request`` and enqueue it as a new job.

        Args:
            request: a chat-completions body (dict) or a ``ChatRequest``.
            priority: 0 (most urgent) to 9; orders both the queue and the wait for rate-limit capacity.
            idempotency_key: submitting the same key again within ``result_ttl_s`` returns the first
                job instead of running the request again.
            webhook: an ``https://`` URL a node POSTs the job's outcome to when it ends, signed as
                Standard Webhooks describes, at least once (docs/webhooks.md).
            webhook_events: progress events also sent to ``webhook``: ``"started"`` (the first
                attempt began), ``"retry"`` (an attempt ended without an answer, another follows).
            on_done: a Celery task name a node sends ``(job_id, status, result_or_error)`` to when
                the job ends, through ``MOONQ_CALLBACK_BROKER_URL``, at least once.
            on_done_queue: the queue of ``on_done`` (default ``celery``).
            builtin_tools: ``"auto"``: a node runs the round trips of Moonshot's builtin tools
                (``$web_search``) itself, so the job's result is the final answer; each round is a
                ``retry`` event with reason ``tool_round``, and the usage sums them. Travels beside
                the request, never in it (docs/moonshot-api.md §6).
            tenant: the tenant to submit as (default: the client's); its models, priorities and
                webhook default apply, and its idempotency keys are its own.

        Raises:
            InvalidRequest: the request or an option broke a documented rule (or the idempotency key
                was used before with a different request); nothing was enqueued.
            TenantModelNotAllowed: the tenant may not use the request's model.
            TenantBudgetExceeded: the tenant has spent a daily budget (docs/tenants.md); nothing was enqueued.
        """
        options["tenant"] = tenant = options.get("tenant") or self.tenant
        job_id = self._submitter.submit(request, priority=priority, idempotency_key=idempotency_key, **options)
        return Job(self, job_id, tenant)

    def submit_many(
        self,
        requests: Iterable[dict[str, Any] | ChatRequest | SubmitItem],
        *,
        priority: int = DEFAULT_PRIORITY,
        **options: Unpack[JobOptions],
    ) -> list[Job]:
        """Validate every request, then enqueue them all with pipelined Redis writes; the jobs in request order.

        A request may be a ``SubmitItem``: a request with options of its own (an ``idempotency_key``,
        a ``priority``, ``webhook``…); what it leaves None takes the call's. ``webhook``, ``webhook_events``,
        ``on_done``, ``on_done_queue`` and ``builtin_tools`` (as in ``submit``) apply to every job: each
        job's end is delivered on its own. An idempotency key used before (or twice in the call) gives
        the first job back, as ``submit`` does.

        All or nothing for validation: one bad request, or a key used before with another request,
        raises ``InvalidRequest`` naming it (``requests.3.messages.0.content: …``,
        ``requests.7.idempotency_key: …``) and nothing is enqueued. (A concurrent submit that takes one
        of the keys for another request meanwhile is found later: the jobs of earlier chunks of 1,000
        are enqueued by then.)
        """
        options["tenant"] = tenant = options.get("tenant") or self.tenant
        job_ids = self._submitter.submit_many(requests, priority=priority, **options)
        return [Job(self, job_id, tenant) for job_id in job_ids]

    def failed(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent dead letters: jobs that ended ``failed``, newest first (the client's tenant's)."""
        return self._submitter.failed(limit, self.tenant)

    def retry(self, job_id: str) -> Job:
        """Run a failed (or cancelled) job's request again, as a new job; returns the new job.

        The old job keeps its outcome and its events (each job ends exactly once); the new record
        names it in ``retry_of``.
        """
        return Job(self, self._submitter.retry(job_id, self.tenant), self.tenant)

    def job(self, job_id: str) -> Job:
        """A handle for an existing job (not checked until used; another tenant's answers ``JobNotFound``)."""
        return Job(self, job_id, self.tenant)

    def close(self) -> None:
        self.fanout.close()
        self.redis.close()
        self._submitter.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _mark(self, job_id: str, field: str, value: str) -> bool:
        """Set one field of a job's record, only while the record exists (never a record without a TTL)."""
        return self._submitter.mark(job_id, field, value)


class Job:
    """A handle on one job; cheap to create, every method reads Redis afresh."""

    def __init__(self, client: Client, job_id: str, tenant: str | None = None) -> None:
        self.client = client
        self.id = job_id
        self.tenant = tenant  # whose jobs this handle may see (None: any)

    def __repr__(self) -> str:
        return f"<Job {self.id}>"

    def record(self, fields: Iterable[str] | None = None) -> dict[str, str]:
        """The job's record, field by field (``moonq/record.py`` names them); ``fields``: only those
        (the request, ``envelope``, can be megabytes: leave it out when it is not wanted)."""
        key, names = self.client.keys.job(self.id), fields_to_read(fields)
        r = self.client.redis
        rec = decode_hash(r.hgetall(key)) if names is None else picked(names, r.hmget(key, names))
        if not rec.get(JobField.STATUS) or not visible(rec, self.tenant):
            raise JobNotFound(self.id)
        return rec

    def status(self) -> str:
        """``queued``, ``running``, ``retrying``, ``succeeded``, ``failed`` or ``cancelled``."""
        return self.record((JobField.STATUS,))[JobField.STATUS]

    def events(self, *, after_seq: int = 0, poll_s: float = 1.0) -> Iterator[Event]:
        """Every event from the first (replayed), then live; ends after the terminal one.

        Each event once, in ``seq`` order (see ``producers/follow.py``); ``poll_s`` bounds how long
        a lost live message can delay the next event.
        """
        self.record((JobField.STATUS,))  # JobNotFound rather than an empty iterator; not the request (up to 100 MB)
        return self._follow(Follower(after_seq), poll_s)

    def _follow(self, follower: Follower, poll_s: float) -> Iterator[Event]:
        r, keys = self.client.redis, self.client.keys
        with self.client.fanout.watch(keys.events(self.id)) as inbox:
            while not follower.done:
                if follower.needs_log:
                    entries = _riding_out_restarts(lambda: r.xrange(keys.log(self.id), min=follower.log_min))
                    yield from follower.take_log(parse_entries(entries or []))
                    continue
                item = inbox.get(poll_s)
                if item is None:
                    follower.quiet(job_exists=bool(_riding_out_restarts(lambda: r.exists(keys.job(self.id)))))
                else:
                    yield from follower.take_live(item)

    def result(self, timeout: float | None = None) -> ChatCompletion:
        """Wait for the job to end and return its completion.

        Raises:
            JobFailed: the job ended failed (``.error`` has type, message, status).
            JobCancelled: the job was cancelled.
            JobTimeout: ``timeout`` seconds passed first.
        """
        wait = ResultWait(self.id, timeout, time.monotonic())
        with self.client.fanout.watch(self.client.keys.events(self.id)) as inbox:
            while True:
                step = wait.step(_riding_out_restarts(self._typed_record), time.monotonic())
                if isinstance(step, ChatCompletion):
                    return step
                inbox.wait_for(wait.wakes, step)

    def cancel(self) -> bool:
        """Stop the job: a queued one never runs, a running one is aborted within about a second.

        Returns False if the job had already ended.
        """
        return self.client._submitter.cancel(self.id, self.tenant)

    def _typed_record(self) -> JobRecord | None:
        rec = JobRecord.from_redis(self.client.redis.hgetall(self.client.keys.job(self.id)))
        if rec is not None and self.tenant is not None and rec.tenant != self.tenant:
            raise JobNotFound(self.id)
        return rec
