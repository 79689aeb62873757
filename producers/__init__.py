"""moonq for producing services: validate and enqueue chat-completion jobs, follow their events.

from producers import Client
job = Client().submit({"model": "kimi-k2.5", "messages": [{"role": "user", "content": "Hi"}]})
for event in job.events(): ...
job.result().choices[0].message.content
"""

from moonq.errors import (
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    MoonqError,
    TenantBudgetExceeded,
    TenantModelNotAllowed,
)
from moonq.wire import ChatCompletion, ChatRequest, Event
from producers.aio import AsyncClient, AsyncJob
from producers.client import Client, Job
from producers.submitter import JobOptions, SubmitItem

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "ChatCompletion",
    "ChatRequest",
    "Client",
    "Event",
    "InvalidRequest",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobNotFound",
    "JobOptions",
    "JobTimeout",
    "MoonqError",
    "SubmitItem",
    "TenantBudgetExceeded",
    "TenantModelNotAllowed",
]
