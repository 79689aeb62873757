"""The Prometheus metric families of a node (names and labels are docs/contract.md's contract).

A node is one process (Celery's thread pool plus one asyncio loop), so one registry holds
everything and counters never jump when pool threads come and go: no multiprocess mode, no
shared directory to clean. Labels stay bounded: model names outside the known set collapse
into ``other``, statuses and reasons into small fixed sets, and no job id is ever a label.
Tenant names are bounded by the tenants file: the node sets its configured names once at start
(``set_tenants``), and any other name a job record carries (a producer that read another file, or
none) collapses into ``other``; without a file the only value is ``default``.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moonq.record import DEFAULT_TENANT

REGISTRY = CollectorRegistry(auto_describe=True)

# LLM latencies run from tens of milliseconds (a cached short answer) to many minutes (a long
# reasoning stream): roughly x2.5 steps from 25 ms to 30 min.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600, 1200, 1800)
# Time to first token and waits for capacity are shorter: 10 ms to 5 min.
SHORT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

KNOWN_MODELS = frozenset(
    {
        "kimi-k3",
        "kimi-k2.7-code",
        "kimi-k2.7-code-highspeed",
        "kimi-k2.6",
        "kimi-k2.5",
        "kimi-k2-0905-preview",
        "kimi-k2-0711-preview",
        "kimi-k2-turbo-preview",
        "kimi-k2-thinking",
        "kimi-k2-thinking-turbo",
        "kimi-latest",
        "moonshot-v1-8k",
        "moonshot-v1-32k",
        "moonshot-v1-128k",
        "moonshot-v1-auto",
        "moonshot-v1-8k-vision-preview",
        "moonshot-v1-32k-vision-preview",
        "moonshot-v1-128k-vision-preview",
    }
)
KNOWN_STATUSES = frozenset({"200", "400", "401", "403", "404", "408", "409", "422", "429", "500", "502", "503", "504"})
KNOWN_REASONS = frozenset(
    {
        "engine_overloaded_error",
        "rate_limit_reached_error",
        "server_error",
        "unexpected_output",
        "upstream_error",
        "timeout",
        "connection_error",
        "connection_dropped",
        "incomplete_stream",
        "invalid_chunk",
        "worker_lost",
        "worker_shutdown",
        "account_switch",
    }
)
OTHER = "other"

JOBS = Counter("moonq_jobs", "Jobs that ended, by outcome.", ["model", "outcome", "tenant"], registry=REGISTRY)
TOKENS = Counter(
    "moonq_tokens",
    "Tokens the upstream reported: prompt, completion, cached (part of prompt), reasoning (part of completion).",
    ["model", "type", "tenant"],
    registry=REGISTRY,
)
COST = Counter(
    "moonq_cost_usd",
    "Estimated spend from reported usage and the price table.",
    ["model", "tenant"],
    registry=REGISTRY,
)
UPSTREAM_DURATION = Histogram(
    "moonq_upstream_request_duration_seconds",
    "One upstream call, request sent to stream end (or error).",
    ["model", "status"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "moonq_time_to_first_token_seconds",
    "Request sent to first streamed chunk.",
    ["model"],
    buckets=SHORT_BUCKETS,
    registry=REGISTRY,
)
JOB_DURATION = Histogram(
    "moonq_job_duration_seconds",
    "Enqueue to the job's end.",
    ["model", "outcome"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "moonq_queue_wait_seconds",
    "Enqueue to the first start of the job.",
    ["model", "tenant"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
RETRIES = Counter(
    "moonq_retries", "New attempts, by the reason the previous one ended.", ["model", "reason"], registry=REGISTRY
)
RATELIMIT_WAIT = Histogram(
    "moonq_ratelimit_wait_seconds",
    "Time a call waited for fleet capacity, by the limit that held it last (none = no wait).",
    ["limit", "tenant"],
    buckets=SHORT_BUCKETS,
    registry=REGISTRY,
)
IN_PROGRESS = Gauge("moonq_jobs_in_progress", "Jobs this node is running now.", ["model"], registry=REGISTRY)
WAITING = Gauge(
    "moonq_jobs_waiting",
    "Jobs of this node waiting for fleet capacity (not yet calling the upstream).",
    ["tenant", "account"],
    registry=REGISTRY,
)

# The values the ``tenant`` label may take besides ``other``: the tenants file's names (``set_tenants``).
_tenants: frozenset[str] = frozenset({DEFAULT_TENANT})


def set_tenants(names: Iterable[str]) -> None:
    """The configured tenant names (``Tenants.names``), set once when the node starts.

    Only these become label values, so a record naming anything else cannot add series.
    """
    global _tenants  # one node, one tenants file, read once at start
    _tenants = frozenset(names)


def tenant_label(name: str) -> str:
    """The job's tenant if the node's tenants file names it (``default`` without a file), else ``other``."""
    return name if name in _tenants else OTHER


def model_label(model: str) -> str:
    return model if model in KNOWN_MODELS else OTHER


def status_label(status: int | None) -> str:
    """HTTP status as text; ``error`` for no answer at all (connection, timeout, cut stream)."""
    if status is None:
        return "error"
    text = str(status)
    return text if text in KNOWN_STATUSES else f"{text[0]}xx"


def reason_label(reason: str) -> str:
    return reason if reason in KNOWN_REASONS else OTHER


# ---- webhooks and Celery callbacks (worker/deliveries.py) ------------------------------------

# A delivery lands within milliseconds of the job's end, or after retries that run for hours.
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
KINDS = frozenset({"webhook", "callback"})
# Attempt results: the answer's status class (408 and 429 apart: they are retried), or what went wrong.
ATTEMPT_RESULTS = frozenset(
    {"2xx", "3xx", "4xx", "408", "429", "5xx", "timeout", "connection_error", "blocked", "unsigned", "sent", "error"}
)
DELIVERY_OUTCOMES = frozenset({"delivered", "dead", "dropped"})

WEBHOOK_DELIVERIES = Counter(
    "moonq_webhook_deliveries",
    "Webhook and callback deliveries that ended: delivered, dead (gave up) or dropped (the job's record was gone).",
    ["kind", "outcome"],
    registry=REGISTRY,
)
WEBHOOK_ATTEMPTS = Counter(
    "moonq_webhook_attempts",
    "Delivery attempts, by the answer's status class or what went wrong.",
    ["kind", "result"],
    registry=REGISTRY,
)
WEBHOOK_LATENCY = Histogram(
    "moonq_webhook_latency_seconds",
    "The job's end to its delivery's success (retries included).",
    ["kind"],
    buckets=DELIVERY_BUCKETS,
    registry=REGISTRY,
)


def attempt_label(result: str) -> str:
    return result if result in ATTEMPT_RESULTS else OTHER
