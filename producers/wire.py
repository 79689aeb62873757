"""What crosses the queue: task names, the job envelope, events and completions.

Producers and workers share only this module (and ``producers.keys``): producers enqueue
by ``TASK_NAME`` and never import worker code. Our own envelope and events are strict
(``extra="forbid"``) and versioned; upstream completions are parsed tolerantly
(``extra="allow"``), because the API adds fields (``system_fingerprint``, new usage keys).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from producers.request import ChatRequest, validate_request

__all__ = [
    "SCHEMA_VERSION",
    "TASK_NAME",
    "TERMINAL_EVENTS",
    "TERMINAL_STATUSES",
    "ChatCompletion",
    "ChatRequest",
    "Event",
    "JobEnvelope",
    "JobStatus",
    "validate_request",
]

SCHEMA_VERSION = 1
TASK_NAME = "moonq.run_job"
DEFAULT_QUEUE = "moonq"
DEFAULT_PRIORITY = 5

JobStatus = Literal["queued", "running", "retrying", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
TERMINAL_EVENTS: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow")


class JobEnvelope(_Strict):
    """The task message: everything a worker needs to run one job, and no secret."""

    v: int = SCHEMA_VERSION
    job_id: str
    request: dict[str, Any]
    enqueued_at: float = Field(default_factory=time.time)
    # 0 is the most urgent, as in Celery's Redis transport; it orders the broker queue and the limiter's line.
    priority: int = Field(default=DEFAULT_PRIORITY, ge=0, le=9)


class ErrorInfo(_Strict):
    """Why a job failed, in the upstream's own terms where there was an upstream answer."""

    type: str
    message: str
    status: int | None = None


class Event(_Strict):
    """One message on ``<prefix>:events:<job_id>`` and in the job's replay log.

    ``seq`` starts at 1 and rises by one per event of the job, across attempts.
    """

    job_id: str
    seq: int
    type: str
    ts: float = Field(default_factory=time.time)
    attempt: int | None = None
    index: int | None = None
    delta: dict[str, Any] | None = None
    reason: str | None = None
    delay_s: float | None = None
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


class FunctionCall(_Tolerant):
    name: str = ""
    arguments: str = ""


class ToolCallOut(_Tolerant):
    id: str = ""
    type: str = "function"
    function: FunctionCall = Field(default_factory=FunctionCall)


class AssistantMessage(_Tolerant):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class Choice(_Tolerant):
    index: int = 0
    message: AssistantMessage = Field(default_factory=AssistantMessage)
    finish_reason: str | None = None


class Usage(_Tolerant):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int | None = None


class ChatCompletion(_Tolerant):
    """A completion in the shape of the API's non-stream response (extra fields kept)."""

    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[Choice] = Field(default_factory=list)
    usage: Usage | None = None
