"""What the console reads about jobs: a page of the recent-jobs index, one job, the dead letters.

The jobs list reads the recent-jobs index (``P:recent``, moonq/keys.py: job id -> enqueued_at,
newest last) by rank, then the records of that page in one pipeline, so a page costs the same with
100,000 jobs as with ten. Filters (status, model, id prefix, tenant) apply within a window of the
index (``FILTER_WINDOW_JOBS`` from the page's start): a first pipeline reads only ``status``,
``model`` and ``tenant`` of the window, a second the whole records of the matches shown. An id that
is not in the index (older than a record's lifetime, or never listed) is still found by exact search.

Tenants: a job belongs to its record's tenant (``tenant_of``; ``default`` without a tenants file),
and a session sees the jobs its principal may see (``Viewer.sees``): a tenant's its own, an
operator's every tenant's. A tenant's list is the index filtered to its tenant.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio

from moonq.indexes import newest_first_async, total_async
from moonq.keys import GROUPS, Keys
from moonq.record import DEFAULT_TENANT, JobField, JobRecord, JobStatus
from moonq.tenants import Principal
from moonq.usage import Price, cost_usd, token_counts

PAGE_JOBS = 50
FILTER_WINDOW_JOBS = 2000
# The record fields a row shows (never the envelope: a request may be 100 MB of images).
ROW_FIELDS = (
    JobField.STATUS,
    JobField.TENANT,
    JobField.MODEL,
    JobField.PRIORITY,
    JobField.ENQUEUED_AT,
    JobField.STARTED_AT,
    JobField.FINISHED_AT,
    JobField.ATTEMPT,
    JobField.SEQ,
    JobField.RESULT,
    JobField.ERROR,
    JobField.RETRY_OF,
)


@dataclass(frozen=True)
class Viewer:
    """Who is looking: the principal the session was opened for (a tenant, or an operator)."""

    principal: Principal

    @property
    def operator(self) -> bool:
        return self.principal.operator

    @property
    def scope(self) -> str | None:
        """The tenant whose jobs this viewer sees; None: every tenant's (an operator)."""
        return None if self.principal.operator else self.principal.tenant

    @property
    def label(self) -> str:
        return "operator" if self.principal.operator else f"tenant {self.principal.tenant}"

    def sees(self, tenant: str) -> bool:
        """Another tenant's job is, to this viewer, a job that does not exist."""
        return self.principal.may_see(tenant)


def tenant_of(rec: JobRecord) -> str:
    """The tenant a job belongs to, as its record says (``default`` without a tenants file)."""
    return rec.tenant


@dataclass(frozen=True)
class JobRow:
    """One job as the console shows it in a list and on its page."""

    id: str
    status: str
    tenant: str
    model: str
    priority: int | None
    attempt: int
    seq: int
    enqueued_at: float | None
    started_at: float | None
    finished_at: float | None
    latency_s: float | None  # enqueue to end; to now while it runs
    tokens: dict[str, int] | None  # prompt, completion, cached, reasoning; None until it succeeded
    total_tokens: int | None
    cost_usd: float | None
    error: dict[str, Any] | None
    retry_of: str | None

    @property
    def terminal(self) -> bool:
        return JobStatus(self.status).terminal

    def summary(self) -> dict[str, Any]:
        """The row as JSON for the job page's live updates."""
        return {
            "id": self.id,
            "status": self.status,
            "attempt": self.attempt,
            "ended": when(self.finished_at),
            "latency": duration(self.latency_s),
            "tokens": self.tokens,
            "total_tokens": self.total_tokens,
            "cost": money(self.cost_usd),
            "error": self.error,
        }


def _loads(text: str | None) -> Any:
    # Written by nodes from upstream data, which may hold NaN or Infinity (not JSON): null instead.
    return json.loads(text, parse_constant=lambda _: None) if text else None


def make_row(job_id: str, rec: JobRecord, prices: dict[str, Price], now: float) -> JobRow:
    """A row from a record; tokens and cost from the completion's usage, priced as the nodes price it."""
    result = _loads(rec.result) if rec.status is JobStatus.SUCCEEDED else None
    usage = result.get("usage") if isinstance(result, dict) else None
    tokens = token_counts(usage) if isinstance(usage, dict) else None
    end = rec.finished_at if rec.terminal else now
    error = _loads(rec.error)
    return JobRow(
        id=job_id,
        status=rec.status.value,
        tenant=tenant_of(rec),
        model=rec.model,
        priority=rec.priority,
        attempt=rec.attempt,
        seq=rec.seq,
        enqueued_at=rec.enqueued_at,
        started_at=rec.started_at,
        finished_at=rec.finished_at,
        latency_s=end - rec.enqueued_at if end is not None and rec.enqueued_at is not None else None,
        tokens=tokens,
        total_tokens=tokens["prompt"] + tokens["completion"] if tokens else None,
        cost_usd=cost_usd(tokens, prices.get(rec.model)) if tokens else None,
        error=error if isinstance(error, dict) else None,
        retry_of=rec.retry_of,
    )


@dataclass(frozen=True)
class Filters:
    """What the jobs list shows: empty strings mean "any"; a tenant's session always has its ``tenant``."""

    status: str = ""
    model: str = ""
    id_prefix: str = ""
    tenant: str = ""

    @property
    def active(self) -> bool:
        return bool(self.status or self.model or self.id_prefix or self.tenant)

    def keep(self, job_id: str, status: str | None, model: str | None, tenant: str | None) -> bool:
        return (
            status is not None
            and (not self.status or status == self.status)
            and (not self.model or model == self.model)
            and (not self.tenant or (tenant or DEFAULT_TENANT) == self.tenant)
            and job_id.startswith(self.id_prefix)
        )


@dataclass(frozen=True)
class Page:
    rows: list[JobRow]
    offset: int
    next_offset: int | None  # where the next page starts in the index, None at its end
    indexed: int  # jobs in the index
    scanned: int  # index entries this page looked at (the filter window)


class JobReader:
    """Reads jobs for the console over the gateway's Redis client."""

    def __init__(self, r: redis.asyncio.Redis, keys: Keys, prices: dict[str, Price]) -> None:
        self.redis = r
        self.keys = keys
        self.prices = prices

    async def page(self, offset: int, filters: Filters, *, now: float, limit: int = PAGE_JOBS) -> Page:
        """Up to ``limit`` jobs from rank ``offset`` of the index (newest first) that pass ``filters``."""
        offset = max(0, offset)
        # A tenant's list reads its own index: a tenant with a few jobs among many finds them on page one.
        indexes = [self.keys.recent_in(g, filters.tenant or None) for g in GROUPS]
        window = FILTER_WINDOW_JOBS if filters.active else limit
        indexed = await total_async(self.redis, indexes)
        ids = [job_id for job_id, _ in await newest_first_async(self.redis, indexes, window, offset=offset)]
        chosen, consumed = ids[:limit], len(ids[:limit])
        if filters.active:
            chosen, consumed = await self._filter(ids, filters, limit)
        rows = await self.rows(chosen, now)
        end = offset + consumed
        return Page(rows, offset, end if end < indexed and consumed else None, indexed, consumed)

    async def _filter(self, ids: list[str], filters: Filters, limit: int) -> tuple[list[str], int]:
        candidates = [i for i in ids if i.startswith(filters.id_prefix)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in candidates:
                pipe.hmget(self.keys.job(job_id), [JobField.STATUS, JobField.MODEL, JobField.TENANT])
            replies = await pipe.execute()
        fields = {
            job_id: tuple(v.decode() if v else None for v in reply)
            for job_id, reply in zip(candidates, replies, strict=True)
        }
        chosen: list[str] = []
        for n, job_id in enumerate(ids):
            status, model, tenant = fields.get(job_id, (None, None, None))
            if filters.keep(job_id, status, model, tenant):
                chosen.append(job_id)
                if len(chosen) == limit:
                    return chosen, n + 1
        return chosen, len(ids)

    async def rows(self, ids: list[str], now: float) -> list[JobRow]:
        """The rows of the jobs whose records still exist, in the order given."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self.keys.job(job_id), list(ROW_FIELDS))
            replies = await pipe.execute()
        out = []
        for job_id, reply in zip(ids, replies, strict=True):
            fields = {name: value for name, value in zip(ROW_FIELDS, reply, strict=True) if value is not None}
            rec = JobRecord.from_redis(fields)
            if rec is not None:
                out.append(make_row(job_id, rec, self.prices, now))
        return out

    async def record(self, job_id: str) -> JobRecord | None:
        return JobRecord.from_redis(await self.redis.hgetall(self.keys.job(job_id)))

    async def tenant(self, job_id: str) -> str | None:
        """The tenant of a job whose record exists, else None: two fields, so another tenant's job (whose
        envelope may be 100 MB) takes no longer to refuse than an unknown one."""
        status, tenant = await self.redis.hmget(self.keys.job(job_id), [JobField.STATUS, JobField.TENANT])
        return (text(tenant) if tenant else DEFAULT_TENANT) if status else None

    async def models(self, tenant: str | None, limit: int = FILTER_WINDOW_JOBS) -> list[str]:
        """The models of the newest ``limit`` jobs (``tenant``'s only, when set), for the filter's choices."""
        indexes = [self.keys.recent_in(g, tenant) for g in GROUPS]
        ids = [job_id for job_id, _ in await newest_first_async(self.redis, indexes, limit)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self.keys.job(job_id), [JobField.MODEL, JobField.TENANT])
            replies = await pipe.execute()
        return sorted({text(m) for m, t in replies if m and (tenant is None or text(t or DEFAULT_TENANT) == tenant)})


def text(x: Any) -> str:
    """A Redis reply item as text (the gateway's client answers bytes)."""
    return x.decode() if isinstance(x, bytes) else str(x)


def when(ts: float | None) -> str:
    """A moment for a person, in the gateway's local time: ``2026-01-31 14:05:09``, or ``-``."""
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def duration(x: float | None) -> str:
    """A latency for a person: ``-``, ``850 ms``, ``12.3 s``, ``4 min 05 s``."""
    if x is None or not math.isfinite(x):
        return "-"
    if x < 1:
        return f"{x * 1000:.0f} ms"
    if x < 60:
        return f"{x:.1f} s"
    minutes, secs = divmod(int(x), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def money(x: float | None) -> str:
    """Dollars with enough places to show a fraction of a cent: ``$0.000123``."""
    if x is None:
        return "-"
    return f"${x:.6f}" if x < 0.01 else f"${x:.4f}"
