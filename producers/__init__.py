"""moonq for producing services: validate and enqueue chat-completion jobs, follow their events.

from producers import Client
job = Client().submit({"model": "kimi-k2.5", "messages": [{"role": "user", "content": "Hi"}]})
for event in job.events(): ...
job.result().choices[0].message.content
"""

from producers.aio import AsyncClient, AsyncJob
from producers.client import Client, Job
from producers.errors import InvalidRequest, JobCancelled, JobFailed, JobNotFound, JobTimeout, MoonqError
from producers.wire import ChatCompletion, ChatRequest, Event

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
    "JobTimeout",
    "MoonqError",
]
