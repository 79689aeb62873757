"""moonq's exception tree (the producer-side half).

    MoonqError                      base of everything moonq raises on purpose
    ├── InvalidRequest              bad input, raised before anything is enqueued
    ├── JobNotFound                 no such job (never submitted, or expired)
    ├── JobTimeout                  result()/events() gave up waiting
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
