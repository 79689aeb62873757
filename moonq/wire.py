"""What crosses the queue: the task name, the job envelope, events and completions.

Producers enqueue by ``TASK_NAME`` and never import worker code. The envelope we write is
strict (``extra="forbid"``) and versioned. Events are read tolerantly (``extra="ignore"``): a
newer node may add a field, and an older SDK must go on reading its events; writers check
their fields against the model instead (``moonq.eventlog.event_body``). Upstream completions
are parsed tolerantly too (``extra="allow"``, extra fields kept), because the API adds fields
(``system_fingerprint``, new usage keys).
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from moonq.errors import InvalidRequest
from moonq.record import TERMINAL_STATUSES, JobStatus
from moonq.request import ChatRequest, validate_request

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
MOST_URGENT, LEAST_URGENT = 0, 9

TERMINAL_EVENTS: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


def check_priority(value: object, field: str = "priority", *, text: bool = False) -> int:
    """``value`` as a job priority: an integer from 0 (most urgent) to 9, else ``InvalidRequest``.

    Bools, floats and strings are refused, except, with ``text=True`` (a header), ASCII digits.
    """
    if text and isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and MOST_URGENT <= value <= LEAST_URGENT:
        return value
    shown = value[:40] if isinstance(value, str) else value
    raise InvalidRequest([(field, f"must be an integer from 0 (most urgent) to 9 (got {shown!r})")])


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


class JobTicket(_Strict):
    """The task message moonq's own producers send: the job's id and what routing needs, not its request.

    The request lives once, in the job's record (its ``envelope`` field); the node reads it there when
    it claims the job. A ``JobEnvelope`` (the request in the message) is still accepted from producers
    that build messages by hand (docs/contract.md).
    """

    v: int = SCHEMA_VERSION
    job_id: str
    enqueued_at: float
    priority: int = Field(default=DEFAULT_PRIORITY, ge=0, le=9)

    @classmethod
    def of(cls, envelope: JobEnvelope) -> JobTicket:
        return cls(v=envelope.v, job_id=envelope.job_id, enqueued_at=envelope.enqueued_at, priority=envelope.priority)


class _Reader(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ErrorInfo(_Reader):
    """Why a job failed, in the upstream's own terms where there was an upstream answer."""

    type: str
    message: str
    status: int | None = None


class Event(_Reader):
    """One message on ``<prefix>:events:<job_id>`` and in the job's replay log.

    ``seq`` starts at 1 and rises by one per event of the job, across attempts. Fields this
    version does not know are ignored, so adding one never breaks an older reader.
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
    # On a ``retry``: True when the earlier deltas stand and the next attempt continues the answer
    # (Partial Mode); ``kept`` is then how many characters of content stand. False, or absent on older
    # events, when they are superseded; ``restart_reason`` says why an answer that had begun to stream
    # starts over instead of continuing (docs/contract.md, Events).
    resume: bool | None = None
    kept: int | None = None
    restart_reason: str | None = None
    # On a ``retry`` with reason ``account_switch``: the upstream account taken out of rotation.
    account: str | None = None
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
