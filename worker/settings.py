"""The worker's typed settings, read from the environment once at the entry point.

Units are in the names. Only this module (and ``moonq.settings``, which it extends)
reads the environment; everything else gets a ``Settings`` passed in.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator

from moonq.settings import ClientSettings
from moonq.webhooks import parse_secrets
from worker.ratelimit import Limits
from worker.retry import INITIAL_RETRY_DELAY, MAX_ATTEMPTS, MAX_RETRY_AFTER_DELAY, MAX_RETRY_DELAY, RetryPolicy
from worker.webhook_http import AllowList

log = logging.getLogger("moonq.worker")


class Settings(ClientSettings):
    """Everything a worker node needs; the API key lives here and nowhere else."""

    moonshot_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("MOONSHOT_API_KEY", "moonshot_api_key")
    )
    # Or a file holding the key (a Docker/Kubernetes secret mounted at /run/secrets/...): read once at
    # start, surrounding whitespace dropped; MOONSHOT_API_KEY wins when both are set.
    moonshot_api_key_file: str | None = Field(
        default=None, validation_alias=AliasChoices("MOONSHOT_API_KEY_FILE", "moonshot_api_key_file")
    )
    moonshot_base_url: str = Field(
        default="https://api.moonshot.ai/v1", validation_alias=AliasChoices("MOONSHOT_BASE_URL", "moonshot_base_url")
    )
    # Fleet-wide limits (None = no limit), shared in Redis by every node (worker/ratelimit.py).
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_inflight: int | None = Field(default=None, ge=1)
    # Deprecated and ignored: the bucket sizes of the limiter before it became a sliding minute. Still
    # accepted, so a deployment that sets them starts; a node logs a warning once.
    rpm_burst: int | None = Field(default=None, ge=1)
    tpm_burst: int | None = Field(default=None, ge=1)
    # In-flight slots of a dead node come back after this long.
    lease_ttl_s: float = Field(default=15.0, gt=0)
    # The wait for fleet capacity: one priority level is worth this much waiting (0 = strict priority),
    # and a job that found no capacity within capacity_wait_s fails (capacity_wait_timeout_error; 0 = no limit).
    priority_aging_s: float = Field(default=60.0, ge=0)
    capacity_wait_s: float = Field(default=900.0, ge=0)
    # A pool of upstream accounts (worker/accounts.py); empty: one account of MOONSHOT_API_KEY and the
    # limits above. An account whose balance is gone (exceeded_current_quota_error) or whose key is
    # refused (401) is out of rotation, fleet-wide, for account_out_s.
    accounts_file: str = ""
    account_out_s: float = Field(default=300.0, gt=0)
    # Each node serves /metrics here (0 = off). metrics_host is the bind address; the node also
    # announces its URL in Redis for `moonq top`, using this host or, for 0.0.0.0, its hostname.
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    # JSON price table laid over the defaults in worker/usage.py (USD per 1M tokens).
    prices_file: str | None = None
    # Jobs one node runs at once. LLM calls wait on the network, not the CPU: a node holds
    # many in flight on an asyncio loop, each Celery thread only waits for its job's future
    # (~70 KiB per job in flight; see BENCHMARKS.md, "Node performance").
    concurrency: int = Field(default=1000, ge=1)
    # Connections of the node's Redis pool, shared by all its jobs (they queue for one when all are busy).
    redis_max_connections: int = Field(default=50, ge=4)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Entries a job's replay log keeps: a longer stream drops its oldest (the completed event holds the
    # whole answer). A delta entry takes ~150 bytes, so the default bounds one log at about 3 MB.
    max_events_per_job: int = Field(default=20_000, ge=1)
    # Longest silence allowed between two stream chunks (thinking models pause before answering).
    read_timeout_s: float = Field(default=300.0, gt=0)
    # A whole attempt, first byte to [DONE]; k3 answers may run for many minutes.
    attempt_timeout_s: float = Field(default=1800.0, gt=0)
    # Celery's own INFO line at each task's end ("Task moonq.run_job[<id>] succeeded in 0.25s: 'failed'"):
    # off by default. The node's event=job_succeeded / job_failed / ... line says more (a failed job is a
    # Celery task that succeeded), and the second line per job cost ~0.1 ms of node CPU. Celery's
    # "received" line and its warnings and errors stay.
    celery_success_log: bool = False

    # Retries (worker/retry.py): attempts per job, first backoff, backoff cap, and a deadline
    # from the first attempt's start after which no new attempt begins.
    max_attempts: int = Field(default=MAX_ATTEMPTS, ge=1)
    backoff_base_s: float = Field(default=INITIAL_RETRY_DELAY, ge=0)
    max_retry_delay_s: float = Field(default=MAX_RETRY_DELAY, ge=0)
    max_retry_after_s: float = Field(default=MAX_RETRY_AFTER_DELAY, ge=0)
    job_deadline_s: float = Field(default=3600.0, gt=0)
    # A stream that breaks after part of the answer was streamed: "partial" continues it with Moonshot's
    # Partial Mode (the text already sent stands), "restart" starts the answer over (worker/resume.py).
    # Partial Mode is Moonshot's: an OpenAI-compatible upstream without it needs "restart".
    resume: Literal["partial", "restart"] = "partial"

    # Liveness. A running job's owner beats every heartbeat_interval_s; a job whose owner has been
    # silent for heartbeat_stale_s may be taken over. Broker messages of a dead node are redelivered
    # visibility_timeout_s after its last beat (Redis broker; Celery's default is one hour).
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    heartbeat_stale_s: float = Field(default=15.0, gt=0)
    visibility_timeout_s: float = Field(default=20.0, gt=0)
    # The sweeper (worker/sweeper.py): every sweep_interval_s one node looks for active jobs with no sign
    # of life (submit, claim or heartbeat) for orphan_after_s, and re-sends those whose message is lost.
    # orphan_after_s must leave redelivery (visibility_timeout_s) time to act first.
    sweep_interval_s: float = Field(default=15.0, gt=0)
    orphan_after_s: float = Field(default=120.0, gt=0)

    # Webhooks and Celery callbacks (docs/webhooks.md; worker/deliveries.py). Secrets: comma-separated
    # whsec_<base64> values, newest first (each delivery is signed with every one). The allow-list
    # (hosts, .domain suffixes, addresses, CIDRs) opens private addresses and plain http.
    webhook_secret: SecretStr | None = None
    webhook_allow: str = ""
    # Where callbacks are sent by a plain Celery app; empty = the broker URL (without moonq's key prefix).
    callback_broker_url: str = ""
    # One attempt's whole time (connect, send, answer); deliveries one node makes at once.
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_concurrency: int = Field(default=32, ge=1)
    # Deliveries run in a child process of the node (worker/delivery_process.py), off the jobs' CPU;
    # false: on the node's own loop (one process fewer, for small nodes and embedded runtimes).
    webhook_process: bool = True
    # Retries: the first backoff (x4 per attempt, +-20% jitter), its cap, and how long after the first
    # attempt retries go on before the delivery gives up (a dead letter, `moonq webhooks failed`).
    webhook_backoff_base_s: float = Field(default=5.0, gt=0)
    webhook_backoff_max_s: float = Field(default=3600.0, gt=0)
    webhook_retry_for_s: float = Field(default=24 * 3600.0, gt=0)
    # A delivery a node took but did not settle (it died) is taken by another node after this long;
    # at least twice webhook_timeout_s, so a live node's attempt is never taken over.
    webhook_claim_idle_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _key_from_file(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        names = ("moonshot_api_key", "MOONSHOT_API_KEY")
        path = data.get("moonshot_api_key_file") or data.get("MOONSHOT_API_KEY_FILE")
        if path and not any(data.get(n) for n in names):
            try:
                key = Path(path).read_text(encoding="utf-8").strip()
            except OSError as err:
                # The error names the file, never its content.
                raise ValueError(f"MOONSHOT_API_KEY_FILE {path}: {err.strerror}") from None
            if not key:
                raise ValueError(f"MOONSHOT_API_KEY_FILE {path} is empty")
            data = {**{k: v for k, v in data.items() if k not in names}, "moonshot_api_key": key}
        return data

    @model_validator(mode="after")
    def _liveness_order(self) -> Settings:
        if not self.heartbeat_interval_s * 2 <= self.heartbeat_stale_s <= self.visibility_timeout_s:
            raise ValueError(
                "need heartbeat_interval_s * 2 <= heartbeat_stale_s <= visibility_timeout_s, so a live job is"
                " never redelivered and a redelivered job is never waited for"
            )
        if self.orphan_after_s < 2 * self.visibility_timeout_s:
            raise ValueError(
                "need orphan_after_s >= 2 * visibility_timeout_s, so the sweeper re-sends only what redelivery"
                " could not bring back"
            )
        ignored = tuple(name for name in ("rpm_burst", "tpm_burst") if getattr(self, name) is not None)
        if ignored:
            _warn_ignored(ignored)
        self.webhook_secrets  # noqa: B018 -- a malformed secret or allow-list stops the node at start
        self.webhook_allow_list  # noqa: B018
        if self.webhook_claim_idle_s < 2 * self.webhook_timeout_s:
            raise ValueError("need webhook_claim_idle_s >= 2 * webhook_timeout_s, so no live attempt is taken over")
        return self

    @property
    def limits(self) -> Limits:
        return Limits(self.rpm, self.tpm, self.max_inflight)

    @property
    def webhook_secrets(self) -> list[bytes]:
        """The signing keys, newest first (empty: webhooks cannot be signed, so they are not sent)."""
        return parse_secrets(self.webhook_secret.get_secret_value()) if self.webhook_secret else []

    @property
    def webhook_allow_list(self) -> AllowList:
        return AllowList.parse(self.webhook_allow)

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            initial_delay_s=self.backoff_base_s,
            max_delay_s=self.max_retry_delay_s,
            max_retry_after_s=self.max_retry_after_s,
            deadline_s=self.job_deadline_s,
        )


@functools.cache
def _warn_ignored(names: tuple[str, ...]) -> None:
    """Once per process: settings still accepted but no longer used (docs/contract.md)."""
    variables = ",".join(f"MOONQ_{name.upper()}" for name in names)
    log.warning("event=deprecated_setting names=%s: ignored, the limiter is a sliding minute now", variables)
