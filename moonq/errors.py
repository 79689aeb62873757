"""moonq's exception tree (the producer-side half).

    MoonqError                      base of everything moonq raises on purpose
    ├── InvalidRequest              bad input, raised before anything is enqueued
    ├── JobNotFound                 no such job (never submitted, or expired)
    ├── JobTimeout                  result()/events() gave up waiting
    ├── TenantModelNotAllowed       the tenant's ``models`` exclude the request's (gateway: 403)
    ├── TenantBudgetExceeded        the tenant spent a daily budget (gateway: 429; docs/tenants.md)
    ├── ConfigFileError             a tenants or accounts file breaks a rule (moonq/configfile.py)
    ├── UnknownTenant               a tenant name the tenants file does not configure
    └── JobFailed                   result() of a job that ended failed
        └── JobCancelled            result() of a job that was cancelled

The worker extends ``MoonqError`` with the upstream errors (``worker/errors.py``).
"""

from __future__ import annotations

from typing import Any


class MoonqError(Exception):
    """Base class of every error moonq raises on purpose."""


class InvalidRequest(MoonqError, ValueError):
    """A request or job option broke a rule; the message names the field and the rule.

    Attributes:
        errors: one ``(field, rule)`` pair per problem found, in input order.
    """

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{field}: {rule}" if field else rule for field, rule in errors))


class TenantModelNotAllowed(MoonqError, PermissionError):
    """The tenant's ``models`` do not include the requested model (the gateway answers 403)."""

    type = "tenant_model_not_allowed_error"

    def __init__(self, tenant: str, model: str, field: str = "model") -> None:
        self.tenant, self.model, self.field = tenant, model, field
        super().__init__(
            f"{field}: tenant {tenant!r} may not use model {model[:80]!r} (its models in the tenants file)"
        )


class TenantBudgetExceeded(MoonqError):
    """The tenant has spent its ``daily_tokens`` or ``daily_usd`` for the UTC day (the gateway answers 429).

    Raised at submit, before anything is enqueued; a job of the tenant that was already queued ends
    ``failed`` with the same ``type`` when a node takes it (docs/tenants.md).

    Attributes:
        tenant: the tenant's name.
        unit: ``"tokens"`` or ``"usd"``: the budget that is spent (``daily_tokens``, ``daily_usd``).
        limit: the budget, as the tenants file sets it.
        spent: what the tenant's jobs have used today, fleet-wide.
        day: the UTC day, ``YYYY-MM-DD``; the budget is whole again at its end.
    """

    type = "tenant_budget_exceeded_error"

    def __init__(self, tenant: str, unit: str, limit: float, spent: float, day: str) -> None:
        self.tenant, self.unit, self.limit, self.spent, self.day = tenant, unit, limit, spent, day
        amounts = f"${spent:.6g} of ${limit:.6g}" if unit == "usd" else f"{spent:.0f} of {limit:.0f} tokens"
        super().__init__(
            f"tenant {tenant!r} has spent its daily_{unit} budget for {day} (UTC): {amounts};"
            " new jobs are refused until 00:00 UTC"
        )


class JobNotFound(MoonqError, LookupError):
    """No job with this id is known (never submitted, or its records expired)."""


class JobTimeout(MoonqError, TimeoutError):
    """Waiting for a job's result or events took longer than the caller allowed."""


class JobFailed(MoonqError):
    """The job ended ``failed``; ``error`` is its ``{type, message, status}`` object."""

    def __init__(self, job_id: str, error: dict[str, Any]) -> None:
        self.job_id = job_id
        self.error = error
        super().__init__(f"job {job_id} {self._verb}: {error.get('type')}: {error.get('message')}")

    _verb = "failed"


class JobCancelled(JobFailed):
    """The job was cancelled before it produced a result."""

    _verb = "was cancelled"
