"""When to try a job again, and after how long: pure decisions, no I/O, no sleeping.

The runner is the one retry owner (httpx only retries failed connects, where nothing was
sent); it asks ``should_retry`` after each failed attempt and waits ``retry_delay``.
Policy, from docs/moonshot-api.md §7 and openai-python's retry core:

- retry 408/409/429 (overload, rate limit), 5xx, timeouts, connection errors, streams cut
  before ``[DONE]`` or a finish_reason, and undecodable chunks (``error.retryable``);
- never 400/401/403/404/422, nor a 429 ``exceeded_current_quota_error`` (billing);
- exponential backoff with jitter, capped; a delay the server names (``retry-after-ms``,
  ``Retry-After`` in seconds or as an HTTP date, Moonshot's "try again after N seconds")
  is honoured up to ``MAX_RETRY_AFTER_DELAY``;
- a per-job attempt budget and a total deadline.
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from worker.errors import UpstreamError

INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 30.0
# A server asking for longer than this is not waited for blindly: the delay is capped here.
MAX_RETRY_AFTER_DELAY = 120.0
# Enough that a job survives a 35% transient fault rate: 0.35**12 ≈ 3e-6 per job.
MAX_ATTEMPTS = 12
# Jitter takes up to this fraction off a computed backoff, so a fleet does not retry in step.
JITTER = 0.25

_AFTER_N_SECONDS = re.compile(r"try again after\s+(\d+(?:\.\d+)?)\s*(?:s\b|sec|second)", re.IGNORECASE)


@dataclass(frozen=True)
class RetryPolicy:
    """Knobs of the policy; tests shrink the delays, deployments may raise the budget."""

    max_attempts: int = MAX_ATTEMPTS
    initial_delay_s: float = INITIAL_RETRY_DELAY
    max_delay_s: float = MAX_RETRY_DELAY
    max_retry_after_s: float = MAX_RETRY_AFTER_DELAY
    deadline_s: float = 3600.0


def parse_retry_after(
    headers: Mapping[str, str] | None, message: str = "", *, now: float | None = None
) -> float | None:
    """The delay the server asked for, in seconds, or None if it named none.

    Reads ``retry-after-ms`` first, then ``retry-after`` (seconds, or an HTTP date), then
    Moonshot's message text ("... please try again after 3 seconds"), which is where
    Moonshot says it: its 429s carry no Retry-After header.
    """
    headers = headers or {}
    lower = {k.lower(): v for k, v in headers.items()}
    raw_ms = lower.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = lower.get("retry-after")
    if raw is not None:
        try:
            return max(0.0, float(raw))
        except ValueError:
            parsed = email.utils.parsedate_tz(raw)
            if parsed is not None:
                when = email.utils.mktime_tz(parsed)
                return max(0.0, when - (time.time() if now is None else now))
    match = _AFTER_N_SECONDS.search(message)
    if match:
        return float(match.group(1))
    return None


def should_retry(error: BaseException, attempt: int, elapsed_s: float, policy: RetryPolicy) -> bool:
    """Whether attempt ``attempt`` (1-based, just failed with ``error``) earns another try."""
    if not isinstance(error, UpstreamError) or not error.retryable:
        return False
    return attempt < policy.max_attempts and elapsed_s < policy.deadline_s


def backoff_delay(attempt: int, policy: RetryPolicy, *, rand: float | None = None) -> float:
    """Exponential backoff for the retry after attempt ``attempt``: 0.5, 1, 2, 4 … s, capped, jittered."""
    base = min(policy.initial_delay_s * 2.0 ** (attempt - 1), policy.max_delay_s)
    r = random.random() if rand is None else rand
    return base * (1 - JITTER * r)


def retry_delay(error: UpstreamError, attempt: int, policy: RetryPolicy, *, rand: float | None = None) -> float:
    """How long to wait before the next attempt: the server's delay if it gave one (capped), else backoff."""
    if error.retry_after_s is not None:
        return min(error.retry_after_s, policy.max_retry_after_s)
    return backoff_delay(attempt, policy, rand=rand)
