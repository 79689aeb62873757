"""A node's side of the tenants' daily budgets: refuse a spent tenant's queued job, count what answers used.

The key and the arithmetic are moonq/budgets.py's. Two calls on a job's path (worker/job.py):

- ``refusal``, after the claim of a queued job: the job's tenant comes with the claim, so a tenant
  without a budget costs nothing, and one with a budget one HMGET. A job whose tenant's budget is
  spent ends ``failed`` (``tenant_budget_exceeded_error``) without calling the upstream. Jobs already
  running (and their retries, and a running job taken over from a dead node) are not stopped: a
  budget can be overshot by what they use.
- ``count``, with a succeeded job's result: its ``usage`` (every billed attempt, resumed, retried or a
  builtin tool round, summed by worker/billing.py) and its cost at this node's prices, added to the
  tenant's hash for the UTC day, in one MULTI with the key's TTL. It is counted right *before* the
  write that ends the job, not after it: whoever sees the job completed (its caller, about to submit
  again) then sees its spend too, and a cancel that arrives in between finds a job that has not ended
  (after the end, it would find an ended job mid-step). Not inside that write: the ending is
  ``APPEND_LUA``, shared by every writer and batched across jobs (moonq/eventlog.py). What this order
  counts is what the upstream billed: if the ending is then fenced (another delivery took the job
  over and runs it again), both runs were billed and both are counted; a node that dies between the
  two steps has its job run again, which is billed again. Failed and cancelled jobs report no usage
  and are not counted (nor are they in ``moonq_tokens_total``).

Only tenants of a tenants file are counted: without one, the default tenant has no budget, and its
jobs pay nothing for budgets.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis

from moonq import budgets
from moonq.errors import TenantBudgetExceeded
from moonq.tenants import TenantConfig, Tenants, cached_tenants
from worker.usage import token_counts, total_tokens


class Budgets:
    """The tenants' budgets, as one node checks and counts them.

    Args:
        tenants_file: ``MOONQ_TENANTS_FILE``; empty: no tenants file, nothing is checked or counted.
    """

    def __init__(self, redis: Redis, prefix: str, tenants_file: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._tenants: Tenants | None = cached_tenants(tenants_file) if tenants_file else None

    async def refusal(self, tenant: str) -> dict[str, Any] | None:
        """The ``failed`` error of a queued job of ``tenant`` whose budget is spent; None: it may run."""
        config = self._config(tenant)
        if config is None or not budgets.limits(config):
            return None
        day = budgets.utc_day(time.time())
        spent = await self._redis.hmget(budgets.key(self._prefix, tenant, day), budgets.FIELDS)
        try:
            budgets.check(tenant, config, budgets.Spend.from_redis(spent), day)
        except TenantBudgetExceeded as err:
            return {"type": err.type, "message": str(err), "status": budgets.HTTP_STATUS}
        return None

    async def count(self, tenant: str, usage: dict[str, Any] | None, usd: float) -> None:
        """Add a succeeded job's ``usage`` (its total tokens) and cost ``usd`` to ``tenant``'s spend today."""
        if self._config(tenant) is None:
            return
        counts = token_counts(usage)
        tokens = total_tokens(usage) or counts["prompt"] + counts["completion"]
        name = budgets.key(self._prefix, tenant, budgets.utc_day(time.time()))
        async with self._redis.pipeline(transaction=True) as pipe:  # the key never exists without its TTL
            pipe.hincrby(name, budgets.TOKENS, tokens)
            pipe.hincrbyfloat(name, budgets.USD, usd)
            pipe.expire(name, budgets.TTL_S)
            await pipe.execute()

    def _config(self, tenant: str) -> TenantConfig | None:
        """The tenant's configuration; None without a tenants file or for a tenant it does not name."""
        if self._tenants is None or tenant not in self._tenants:
            return None
        return self._tenants.get(tenant)
