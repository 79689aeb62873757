"""The retry policy as tables: which failures are retried, and after how long."""

from __future__ import annotations

import email.utils
import json

import pytest

from worker.errors import (
    RateLimited,
    StreamInterrupted,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
    error_from_response,
)
from worker.retry import (
    INITIAL_RETRY_DELAY,
    MAX_ATTEMPTS,
    MAX_RETRY_AFTER_DELAY,
    MAX_RETRY_DELAY,
    RetryPolicy,
    backoff_delay,
    parse_retry_after,
    retry_delay,
    should_retry,
)

POLICY = RetryPolicy()


def body(type_: str, message: str = "m") -> bytes:
    return json.dumps({"error": {"message": message, "type": type_}}).encode()


@pytest.mark.parametrize(
    ("status", "type_", "cls", "retry"),
    [
        (400, "invalid_request_error", UpstreamRejected, False),
        (400, "content_filter", UpstreamRejected, False),
        (401, "invalid_authentication_error", UpstreamRejected, False),
        (401, "incorrect_api_key_error", UpstreamRejected, False),
        (403, "permission_denied_error", UpstreamRejected, False),
        (404, "resource_not_found_error", UpstreamRejected, False),
        (422, "unprocessable", UpstreamRejected, False),
        (408, "timeout", UpstreamUnavailable, True),
        (409, "conflict", UpstreamUnavailable, True),
        (429, "engine_overloaded_error", RateLimited, True),
        (429, "rate_limit_reached_error", RateLimited, True),
        (429, "exceeded_current_quota_error", UpstreamRejected, False),
        (500, "server_error", UpstreamUnavailable, True),
        (500, "unexpected_output", UpstreamUnavailable, True),
        (502, "upstream_error", UpstreamUnavailable, True),
        (503, "upstream_error", UpstreamUnavailable, True),
        (504, "upstream_error", UpstreamUnavailable, True),
    ],
)
def test_status_to_class_and_decision(status: int, type_: str, cls: type, retry: bool) -> None:
    err = error_from_response(status, body(type_))
    assert type(err) is cls and err.type == type_ and err.status == status
    assert should_retry(err, 1, 0.0, POLICY) is retry


@pytest.mark.parametrize(
    "err",
    [
        StreamInterrupted("cut", type="connection_dropped"),
        StreamInterrupted("no [DONE]", type="incomplete_stream"),
        StreamInterrupted("bad json", type="invalid_chunk"),
        UpstreamUnavailable("t", type="timeout"),
        UpstreamUnavailable("c", type="connection_error"),
    ],
)
def test_transport_failures_are_retried(err: UpstreamError) -> None:
    assert should_retry(err, 1, 0.0, POLICY)


def test_non_upstream_errors_are_not_retried() -> None:
    assert not should_retry(ValueError("bug"), 1, 0.0, POLICY)


@pytest.mark.parametrize(
    ("attempt", "elapsed", "expected"),
    [(1, 0, True), (MAX_ATTEMPTS - 1, 0, True), (MAX_ATTEMPTS, 0, False), (1, 3599, True), (1, 3600, False)],
)
def test_attempt_budget_and_deadline(attempt: int, elapsed: float, expected: bool) -> None:
    assert should_retry(RateLimited("x"), attempt, elapsed, POLICY) is expected


def test_budget_survives_a_35_percent_fault_rate() -> None:
    assert 0.35**MAX_ATTEMPTS < 1e-5


NOW = 1_767_225_600.0


@pytest.mark.parametrize(
    ("headers", "message", "expected"),
    [
        ({"retry-after-ms": "1500"}, "", 1.5),
        ({"Retry-After-Ms": "250", "Retry-After": "9"}, "", 0.25),  # ms wins
        ({"retry-after": "3"}, "", 3.0),
        ({"Retry-After": "2.5"}, "", 2.5),
        ({"retry-after": email.utils.formatdate(NOW + 7, usegmt=True)}, "", 7.0),
        ({"retry-after": email.utils.formatdate(NOW - 7, usegmt=True)}, "", 0.0),
        ({"retry-after": "soon"}, "", None),
        (
            {},
            "Your account org<ak> request reached organization max concurrency: 50, please try again after 3 seconds",
            3.0,
        ),
        ({}, "max RPM: 200, please try again after 12 seconds", 12.0),
        ({}, "The engine is currently overloaded, please try again later", None),
        (None, "", None),
    ],
)
def test_parse_retry_after(headers: dict[str, str] | None, message: str, expected: float | None) -> None:
    assert parse_retry_after(headers, message, now=NOW) == expected


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [
        (1, 0.0, INITIAL_RETRY_DELAY),
        (2, 0.0, 2 * INITIAL_RETRY_DELAY),
        (3, 0.0, 4 * INITIAL_RETRY_DELAY),
        (1, 1.0, 0.75 * INITIAL_RETRY_DELAY),  # jitter takes off at most a quarter
        (30, 0.0, MAX_RETRY_DELAY),  # capped
    ],
)
def test_backoff(attempt: int, rand: float, expected: float) -> None:
    assert backoff_delay(attempt, POLICY, rand=rand) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [(None, INITIAL_RETRY_DELAY), (4.0, 4.0), (0.0, 0.0), (3600.0, MAX_RETRY_AFTER_DELAY)],
)
def test_server_delay_wins_within_a_cap(retry_after: float | None, expected: float) -> None:
    err = RateLimited("x", retry_after_s=retry_after)
    assert retry_delay(err, 1, POLICY, rand=0.0) == expected
