"""One delivery of one job: claim it, run attempts until an outcome, record exactly one ending.

Delivery is at least once, so ``run_job`` is written to be called more than once for the
same job: the claim refuses a job that has already ended, waits while another live node
owns it, and every write afterwards is fenced by this delivery's owner token, so a stale
delivery can neither add to nor end a job that another one owns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from moonq.eventlog import append_args, event_body
from moonq.keys import Keys
from moonq.record import JobField, JobStatus
from moonq.tenants import cached_tenants
from moonq.wire import JobEnvelope, JobTicket
from worker import metrics
from worker.answer import Answer
from worker.assemble import StreamAssembler
from worker.budgets import Budgets
from worker.delivery import Claim, Deliveries, Delivery, claim
from worker.errors import RateLimited, StreamInterrupted, UpstreamError, UpstreamUnavailable
from worker.estimate import reservation
from worker.publisher import EventWriter, Fenced
from worker.ratelimit import DEFAULT_ACCOUNT, Limiter
from worker.retry import RetryPolicy, retry_delay, should_retry
from worker.rounds import TOOL_ROUND, offers_builtin
from worker.settings import Settings
from worker.sink import ScriptSink
from worker.upstream import UpstreamClient, stream_chat
from worker.usage import Price, cost_usd, token_counts

log = logging.getLogger("moonq.worker")

# The retry reason of a job that goes on on another account, and the errors that send it there (with a 401).
ACCOUNT_SWITCH = "account_switch"
ACCOUNT_GONE_TYPES = frozenset({"exceeded_current_quota_error"})

# What reading a chunk of the wrong shape raises in the assembler or the event encoder.
MALFORMED = (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError, OverflowError)

Outcome = Literal["succeeded", "failed", "cancelled", "skipped", "requeued"]


@dataclass
class JobContext:
    """What one process shares between the jobs it runs."""

    settings: Settings
    keys: Keys
    redis: Redis
    upstreams: dict[str, UpstreamClient]  # by account name (worker/accounts.py)
    append: ScriptSink
    claim: AsyncScript
    limiter: Limiter
    policy: RetryPolicy
    prices: dict[str, Price] = field(default_factory=dict)
    deliveries: Deliveries = field(default_factory=Deliveries)
    shutting_down: bool = False
    budgets: Budgets = field(init=False)

    def __post_init__(self) -> None:
        # Read when the node starts: a tenants file that breaks a rule stops it there, naming the rule.
        self.budgets = Budgets(self.redis, self.keys.prefix, self.settings.tenants_file)
        metrics.set_tenants(cached_tenants(self.settings.tenants_file).names)  # the tenant label's values


async def reject_envelope(ctx: JobContext, raw: Any, problem: str) -> Outcome:
    """A task message this node cannot read as a ``JobEnvelope``: never retried, never lost silently.

    Logged once; if it names a job whose record exists, that job ends ``failed`` (type
    ``invalid_envelope``, the message naming the field) and goes to the dead letters. The caller
    acknowledges the message: delivering it again could only fail the same way.
    """
    job_id = raw.get("job_id") if isinstance(raw, dict) else None
    log.error("event=invalid_envelope job_id=%s problem=%r", job_id, problem[:500])
    if not isinstance(job_id, str) or not await ctx.redis.exists(ctx.keys.job(job_id)):
        return "failed"
    now = time.time()
    info = {"type": "invalid_envelope", "message": f"the task message is not a job this worker can run: {problem}"}
    await _index_dead_letter(ctx, job_id, now)
    fields: dict[str, str] = {
        JobField.STATUS: JobStatus.FAILED,
        JobField.ERROR: json.dumps(info),
        JobField.FINISHED_AT: str(now),
    }
    keys, argv = append_args(
        ctx.keys, job_id, [event_body(job_id, "failed", error=info)], ttl_s=ctx.settings.result_ttl_s, fields=fields
    )
    await ctx.append(keys=keys, args=argv)
    return "failed"


async def run_job(ctx: JobContext, message: JobEnvelope | JobTicket, delivery_tag: str | None = None) -> Outcome:
    """Run one delivery of a job to its outcome. ``message``: the request itself (a ``JobEnvelope``), or
    a ``JobTicket`` whose request is read from the job's record by the claim.

    Returns ``skipped`` when this delivery must not run the job (it ended, is gone, or another
    delivery took it over), and ``requeued`` when the node is shutting down and the message goes back.
    """
    task = asyncio.current_task()
    assert task is not None
    delivery = Delivery(message.job_id, uuid.uuid4().hex, task, delivery_tag)
    ctx.deliveries.add(delivery)
    try:
        return await _deliver(ctx, message, delivery)
    finally:
        ctx.deliveries.remove(delivery)


async def _claim(ctx: JobContext, delivery: Delivery, envelope: bool) -> Claim | None:
    """The delivery's claim; None if the node began shutting down while it waited parked."""
    try:
        return await claim(
            ctx.claim,
            ctx.redis,
            ctx.keys,
            delivery,
            stale_s=ctx.settings.heartbeat_stale_s,
            wait_s=ctx.settings.heartbeat_interval_s,
            envelope=envelope,
            stopping=lambda: ctx.shutting_down,
        )
    except asyncio.CancelledError:
        if ctx.shutting_down:  # a parked delivery owns nothing: its message just goes back
            return None
        raise


async def _deliver(ctx: JobContext, message: JobEnvelope | JobTicket, delivery: Delivery) -> Outcome:
    job_id = message.job_id
    got = await _claim(ctx, delivery, envelope=isinstance(message, JobTicket))
    if got is None:
        return "requeued"
    if got.verdict not in ("run", "takeover", "cancel"):
        _log_skipped(job_id, got.verdict)
        return "skipped"
    envelope = _envelope_of(message, got)
    if isinstance(envelope, str):  # a record written by hand, or by another version
        delivery.owns = True
        return await reject_envelope(ctx, {"job_id": job_id}, envelope)
    return await _run_claimed(ctx, envelope, got, delivery)


async def _run_claimed(ctx: JobContext, envelope: JobEnvelope, got: Claim, delivery: Delivery) -> Outcome:
    """A claimed delivery (verdict run, takeover or cancel) to its outcome."""
    job_id = envelope.job_id
    attempt = got.attempt
    writer = EventWriter(
        ctx.append,
        ctx.keys,
        job_id,
        owner=delivery.owner,
        ttl_s=ctx.settings.result_ttl_s,
        seq=got.seq,
        max_events=ctx.settings.max_events_per_job,
        idempotency_key=got.idempotency_key,
    )
    model = metrics.model_label(str(envelope.request.get("model", "")))
    if got.verdict == "cancel":
        return await _end_cancelled(writer, envelope, got.tenant)
    delivery.owns = True
    if attempt == 1:
        waited = max(0.0, time.time() - envelope.enqueued_at)
        metrics.QUEUE_WAIT.labels(model, metrics.tenant_label(got.tenant)).observe(waited)
    metrics.IN_PROGRESS.labels(model).inc()
    try:
        if got.verdict == "takeover":
            # Subscribers saw deltas of an attempt that will never finish: tell them it is superseded.
            await writer.write("retry", {}, attempt=attempt, reason="worker_lost", delay_s=0.0)
            metrics.RETRIES.labels(model, "worker_lost").inc()
            log.info(
                "event=job_retry job_id=%s model=%s attempt=%s reason=worker_lost delay_s=0", job_id, model, attempt
            )
        # The claim found no cancel; one asked for since is caught by its announcement (the listener
        # cancels this task) or, if that was missed, by _still_ours before the upstream call.
        refused = await _refused(ctx, got)
        if refused is not None:
            return await _end_failed(ctx, writer, envelope, refused, attempt, got.tenant)
        return await _attempts(ctx, envelope, writer, attempt, got.tenant)
    except asyncio.CancelledError:
        if await _cancel_requested(ctx, job_id):
            return await _end_cancelled(writer, envelope, got.tenant)
        if ctx.shutting_down:
            return await _requeue(writer, attempt)
        raise
    except Fenced:
        log.warning("event=delivery_fenced job_id=%s: lost ownership; it stops writing", job_id)
        return "skipped"
    finally:
        metrics.IN_PROGRESS.labels(model).dec()


def _log_skipped(job_id: str, verdict: str) -> None:
    # 'gone' is worth a warning: a message whose job has no record (it ended long ago, or was never recorded).
    level = logging.WARNING if verdict == "gone" else logging.INFO
    log.log(level, "event=delivery_skipped job_id=%s status=%s", job_id, verdict)


def _envelope_of(message: JobEnvelope | JobTicket, got: Claim) -> JobEnvelope | str:
    """The job's envelope: the message itself, or (a ticket) the record's as the claim read it; else
    what is wrong with the record's."""
    if isinstance(message, JobEnvelope):
        return message
    try:
        return JobEnvelope.model_validate_json(got.envelope)
    except ValidationError as err:
        return f"the record's envelope: {err.errors()[0]['msg']}"


async def _refused(ctx: JobContext, got: Claim) -> dict[str, Any] | None:
    """The error a claimed job ends ``failed`` with before any call, or None when it may run."""
    if got.attempt > ctx.policy.max_attempts:
        # Deliveries that never finished (e.g. a job that keeps killing its node) still end.
        info = {"type": "attempts_exhausted", "message": f"{got.attempt - 1} attempts started, none finished"}
        return {**info, "status": None}
    # A queued job of a tenant whose budget is spent never calls the upstream; a running one finishes.
    return await ctx.budgets.refusal(got.tenant) if got.verdict == "run" else None


async def _cancel_requested(ctx: JobContext, job_id: str) -> bool:
    return bool(await ctx.redis.hget(ctx.keys.job(job_id), JobField.CANCEL_REQUESTED) == b"1")


async def _attempts(ctx: JobContext, envelope: JobEnvelope, writer: EventWriter, attempt: int, tenant: str) -> Outcome:
    """Attempt after attempt until one succeeds or the policy says stop; the one retry loop.

    What each attempt sends, whether a broken stream is continued or started over, the builtin
    tool rounds and the usage over all attempts are decided by ``Answer`` (worker/answer.py).
    """
    started = time.monotonic()
    model = metrics.model_label(str(envelope.request.get("model", "")))
    builtin = await _builtin_tools(ctx, envelope)
    answer = Answer(envelope.request, resume_mode=ctx.settings.resume, builtin_tools=builtin)
    while True:
        assembler = StreamAssembler()
        try:
            completion = await _attempt(ctx, envelope, writer, attempt, answer, assembler, tenant)
        except UpstreamError as err:
            if await _switch_account(ctx, err, tenant):
                decision = answer.broke(attempt, err.type, assembler)
                attempt += 1
                await writer.write(
                    "retry",
                    {JobField.ATTEMPT: str(attempt)},
                    attempt=attempt,
                    reason=ACCOUNT_SWITCH,
                    delay_s=0.0,
                    account=err.account,
                    **decision.event_fields(),
                )
                metrics.RETRIES.labels(model, ACCOUNT_SWITCH).inc()
                log.warning(
                    "event=account_switch job_id=%s account=%s error_type=%s status=%s: out of rotation for %gs",
                    envelope.job_id,
                    err.account,
                    err.type,
                    err.status,
                    ctx.settings.account_out_s,
                )
                if await _cancel_requested(ctx, envelope.job_id):
                    raise asyncio.CancelledError from None
                continue
            if not should_retry(err, attempt, time.monotonic() - started, ctx.policy):
                return await _end_failed(ctx, writer, envelope, err.info(), attempt, tenant)
            delay = retry_delay(err, attempt, ctx.policy)
            if isinstance(err, RateLimited):
                await ctx.limiter.cooldown(delay, err.account or DEFAULT_ACCOUNT)  # every node holds back
            decision = answer.broke(attempt, err.type, assembler)
            attempt += 1
            await writer.write(
                "retry",
                {JobField.STATUS: JobStatus.RETRYING, JobField.ATTEMPT: str(attempt)},
                attempt=attempt,
                reason=err.type,
                delay_s=delay,
                **decision.event_fields(),
            )
            metrics.RETRIES.labels(model, metrics.reason_label(err.type)).inc()
            log.info(
                "event=job_retry job_id=%s model=%s attempt=%s reason=%s status=%s delay_s=%.2f resume=%s",
                envelope.job_id,
                model,
                attempt,
                err.type,
                err.status,
                delay,
                "yes" if decision.resume else decision.restart_reason or "no",
            )
            await asyncio.sleep(delay)
            if await _cancel_requested(ctx, envelope.job_id):  # asked while it waited, announcement missed or not
                raise asyncio.CancelledError from None
            await writer.write(None, {JobField.STATUS: JobStatus.RUNNING})
            continue
        result = answer.answered(attempt, completion, assembler)
        if result is None:  # a builtin tool round follows (worker/rounds.py): the round's deltas are superseded
            attempt += 1
            await writer.write(
                "retry", {JobField.ATTEMPT: str(attempt)}, attempt=attempt, reason=TOOL_ROUND, delay_s=0.0, resume=False
            )
            if await _cancel_requested(ctx, envelope.job_id):
                raise asyncio.CancelledError from None
            continue
        return await _end_succeeded(ctx, writer, envelope, result, attempt, tenant)


async def _switch_account(ctx: JobContext, err: UpstreamError, tenant: str) -> bool:
    """Whether the job goes on on another account: ``err`` says this one cannot serve anyone (its balance is
    gone, its key is refused) and the tenant may use another that is in rotation. If so, this one is taken
    out of rotation fleet-wide for ``account_out_s``; the last account standing stays in, and the job fails
    with the upstream's error, as a node with one account does."""
    if err.account is None or not (err.type in ACCOUNT_GONE_TYPES or err.status == 401):
        return False
    others = set(ctx.limiter.candidates(tenant)) - {err.account} - await ctx.limiter.out_of_rotation()
    if not others:
        return False
    await ctx.limiter.take_out(err.account, ctx.settings.account_out_s)
    return True


async def _end_succeeded(
    ctx: JobContext, writer: EventWriter, envelope: JobEnvelope, result: dict[str, Any], attempt: int, tenant: str
) -> Outcome:
    model = metrics.model_label(str(envelope.request.get("model", "")))
    counts = token_counts(result.get("usage"))
    usd = cost_usd(counts, ctx.prices.get(str(envelope.request.get("model"))))
    await ctx.budgets.count(tenant, result.get("usage"), usd)  # before the end: see worker/budgets.py
    record: dict[str, Any] = {
        JobField.STATUS: JobStatus.SUCCEEDED,
        JobField.RESULT: result,
        JobField.FINISHED_AT: str(time.time()),
    }
    cancelled = await _write_end(ctx, writer, envelope, tenant, "completed", record, attempt=attempt, result=result)
    for kind, n in counts.items():  # spent either way: the answer was whole
        if n:
            metrics.TOKENS.labels(model, kind, metrics.tenant_label(tenant)).inc(n)
    metrics.COST.labels(model, metrics.tenant_label(tenant)).inc(usd)
    if cancelled is not None:
        return cancelled
    _record_end(envelope, "succeeded", tenant)
    log.info(
        "event=job_succeeded job_id=%s model=%s attempt=%s prompt_tokens=%s completion_tokens=%s"
        " cached_tokens=%s latency_s=%.3f",
        envelope.job_id,
        model,
        attempt,
        counts["prompt"],
        counts["completion"],
        counts["cached"],
        time.time() - envelope.enqueued_at,
    )
    return "succeeded"


async def _builtin_tools(ctx: JobContext, envelope: JobEnvelope) -> str | None:
    """The job's ``builtin_tools`` option (its record's field); read only when a builtin tool is offered."""
    if not offers_builtin(envelope.request):
        return None
    raw = await ctx.redis.hget(ctx.keys.job(envelope.job_id), JobField.BUILTIN_TOOLS)
    value = raw.decode() if isinstance(raw, bytes) else raw
    return value or None


def _account_label(ctx: JobContext, tenant: str) -> str:
    """The account a waiting call waits for: its tenant's one pinned account, or ``any``."""
    candidates = ctx.limiter.candidates(tenant)
    return candidates[0] if len(candidates) == 1 else "any"


def _record_end(envelope: JobEnvelope, outcome: str, tenant: str) -> None:
    model = metrics.model_label(str(envelope.request.get("model", "")))
    metrics.JOBS.labels(model, outcome, metrics.tenant_label(tenant)).inc()
    # The duration stays without the tenant: its buckets times the tenants would be the node's largest family.
    metrics.JOB_DURATION.labels(model, outcome).observe(max(0.0, time.time() - envelope.enqueued_at))


async def _still_ours(ctx: JobContext, job_id: str, owner: str) -> None:
    """Before a call upstream (which is billed): the job is still this delivery's, not cancelled, and the
    node is not shutting down.

    A delivery that stalled (a paused process, a long wait for capacity) may have been taken over,
    or the job cancelled, meanwhile; its writes would be fenced, but only after it paid for a call.
    A shutdown's cancel (``Runtime.shutdown``) is delivered once, and on Python 3.11 one that lands
    while a Redis command is sent is lost (moonq/cancel.py): the flag it sets is checked here too,
    or the job would stream to its end while the node waits to exit.

    Raises:
        Fenced: another delivery owns the job, or it ended.
        asyncio.CancelledError: a cancel was requested (whether or not its announcement arrived), or
            the node is shutting down (the job goes back to the queue).
    """
    if ctx.shutting_down:
        raise asyncio.CancelledError
    raw = await ctx.redis.hmget(ctx.keys.job(job_id), [JobField.OWNER, JobField.STATUS, JobField.CANCEL_REQUESTED])
    mine, status, cancel = (x.decode() if isinstance(x, bytes) else x for x in raw)
    if mine != owner or status is None or JobStatus(status).terminal:
        raise Fenced(job_id)
    if cancel == "1":
        raise asyncio.CancelledError


async def _attempt(
    ctx: JobContext,
    envelope: JobEnvelope,
    writer: EventWriter,
    attempt: int,
    answer: Answer,
    assembler: StreamAssembler,
    tenant: str,
) -> dict[str, Any]:
    """One upstream call of ``answer.request`` inside the fleet's limits; returns the assembled completion.

    ``assembler`` and ``answer`` see every chunk and every published delta, also when the call fails:
    the loop decides from them how the answer goes on.
    """
    request = answer.request
    answer.begin()
    model = metrics.model_label(str(request.get("model", "")))
    waiting = metrics.WAITING.labels(metrics.tenant_label(tenant), _account_label(ctx, tenant))
    waiting.inc()
    try:
        lease = await ctx.limiter.acquire(
            reservation(request), priority=envelope.priority, enqueued_at_s=envelope.enqueued_at, tenant=tenant
        )
    finally:
        waiting.dec()
    metrics.RATELIMIT_WAIT.labels(lease.limit, metrics.tenant_label(tenant)).observe(lease.waited_s)
    try:
        await _still_ours(ctx, envelope.job_id, writer.owner)
    except BaseException:
        await asyncio.shield(ctx.limiter.release(lease, 0))  # nothing was sent: all of it back
        raise
    used: int | None = None  # unknown: no refund
    status: int | None = None
    sent = time.monotonic()
    try:
        async with asyncio.timeout(ctx.settings.attempt_timeout_s):
            first_token = True
            async for chunk in stream_chat(ctx.upstreams[lease.account], request):
                try:
                    pieces = assembler.feed(chunk)
                    for index, delta in pieces:
                        writer.emit_delta(attempt, index, delta)
                        answer.published(index, delta)
                except MALFORMED as err:
                    # JSON, but not in the shape of a chunk (an index that is not a number, a delta that
                    # is not an object, nesting too deep to relay): the stream is broken, not the node.
                    raise StreamInterrupted(f"undecodable chunk: {err!r}"[:300], type="invalid_chunk") from err
                # The role-only opening chunk is not a token; reasoning, text or a tool call is.
                if first_token and any(
                    d.get(k) for _, d in pieces for k in ("content", "reasoning_content", "tool_calls")
                ):
                    metrics.TIME_TO_FIRST_TOKEN.labels(model).observe(time.monotonic() - sent)
                    first_token = False
        result = assembler.finish()
        status = 200
        if assembler.usage_problem is not None:
            # Dropped, not retried: the answer is whole, and another call would bill again for the same number.
            log.warning(
                "event=usage_dropped job_id=%s model=%s problem=%r", envelope.job_id, model, assembler.usage_problem
            )
        # A usage the assembler kept holds only counts (worker/usage.py usage_problem): int() cannot fail.
        usage = result.get("usage") or {}
        used = int(usage.get("total_tokens") or 0) or None
        return result
    except UpstreamError as err:
        status = err.status
        err.account = lease.account
        if err.status is not None:
            used = 0  # answered with an error before generating anything
        raise
    except TimeoutError as err:
        raise UpstreamUnavailable(f"attempt exceeded {ctx.settings.attempt_timeout_s}s", type="timeout") from err
    finally:
        metrics.UPSTREAM_DURATION.labels(model, metrics.status_label(status)).observe(time.monotonic() - sent)
        await asyncio.shield(ctx.limiter.release(lease, used))


async def _index_dead_letter(ctx: JobContext, job_id: str, now: float) -> None:
    """Add the job to the dead-letter index (``moonq failed``), trimmed to the records' lifetime.

    Called before the terminal event is written, so whoever sees the job fail finds it there;
    ``failed()`` lists an entry only once its record says failed, so an entry whose terminal write
    is then fenced stays hidden.
    """
    failed = ctx.keys.failed_for(job_id)
    async with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.zadd(failed, {job_id: now})
        pipe.zremrangebyscore(failed, "-inf", now - ctx.settings.result_ttl_s)
        pipe.expire(failed, ctx.settings.result_ttl_s)
        await pipe.execute()


async def _end_failed(
    ctx: JobContext, writer: EventWriter, envelope: JobEnvelope, info: dict[str, Any], attempt: int, tenant: str
) -> Outcome:
    now = time.time()
    await _index_dead_letter(ctx, writer.job_id, now)
    record: dict[str, Any] = {JobField.STATUS: JobStatus.FAILED, JobField.ERROR: info, JobField.FINISHED_AT: str(now)}
    cancelled = await _write_end(ctx, writer, envelope, tenant, "failed", record, error=info)
    if cancelled is not None:
        return cancelled
    _record_end(envelope, "failed", tenant)
    log.info(
        "event=job_failed job_id=%s model=%s attempt=%s error_type=%s status=%s latency_s=%.3f",
        writer.job_id,
        metrics.model_label(str(envelope.request.get("model", ""))),
        attempt,
        info.get("type"),
        info.get("status"),
        now - envelope.enqueued_at,
    )
    return "failed"


async def _write_end(
    ctx: JobContext,
    writer: EventWriter,
    envelope: JobEnvelope,
    tenant: str,
    type: str,
    record: dict[str, Any],
    **fields: Any,
) -> Outcome | None:
    """Write the job's own end (``completed``, ``failed``) unless a cancel was asked for; None when written.

    A cancel the node did not hear of in time (its link to Redis was down when it was announced, and the
    answer ended meanwhile) ends the job cancelled instead, as docs/guarantees.md promises (5): that
    outcome is returned.

    Raises:
        Fenced: the job is not ours (another attempt owns it, or it ended).
    """
    try:
        await writer.write(type, record, unless_cancelled=True, **fields)
        return None
    except Fenced:
        if not await _cancel_requested(ctx, envelope.job_id):
            raise
    log.info("event=cancel_unheard job_id=%s: asked for before the job's end was written", envelope.job_id)
    return await _end_cancelled(writer, envelope, tenant)


async def _end_cancelled(writer: EventWriter, envelope: JobEnvelope, tenant: str) -> Outcome:
    try:
        await writer.write("cancelled", {JobField.STATUS: JobStatus.CANCELLED, JobField.FINISHED_AT: str(time.time())})
    except Fenced:
        return "cancelled"  # ended some other way first (e.g. the producer cancelled it while queued)
    _record_end(envelope, "cancelled", tenant)
    log.info("event=job_cancelled job_id=%s", writer.job_id)
    return "cancelled"


async def _requeue(writer: EventWriter, attempt: int) -> Outcome:
    """The node is shutting down: hand the job back to the queue with a ``retry`` event."""
    await writer.write(
        "retry",
        {JobField.STATUS: JobStatus.QUEUED, JobField.OWNER: ""},
        attempt=attempt + 1,
        reason="worker_shutdown",
        delay_s=0.0,
    )
    log.info("event=job_requeued job_id=%s reason=worker_shutdown", writer.job_id)
    return "requeued"
