"""A caller's own Celery app, for tests/test_callbacks.py: plain Celery, nothing of moonq's.

Run as ``celery -A tests.callback_app worker -Q QUEUE`` with ``CALLBACK_BROKER_URL`` (where moonq's
nodes send callbacks) and ``CALLBACK_RESULTS`` (a Redis list the task appends what it got to).
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery

app = Celery("callback-test", broker=os.environ.get("CALLBACK_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True)


@app.task(name="myapp.tasks.handle_answer", bind=True)  # type: ignore[untyped-decorator]
def handle_answer(self: Any, job_id: str, status: str, outcome: dict[str, Any] | None) -> None:
    """What a caller chains after a job: here, record the arguments and the task id."""
    got = {"task_id": self.request.id, "job_id": job_id, "status": status, "outcome": outcome}
    with redis.Redis.from_url(os.environ["CALLBACK_BROKER_URL"]) as r:
        r.rpush(os.environ["CALLBACK_RESULTS"], json.dumps(got))
