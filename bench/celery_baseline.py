"""The baseline: plain Celery, limited the way Celery's documentation suggests.

    BENCH_BROKER_URL=redis://... BENCH_BASE_URL=http://.../v1 BENCH_RATE_LIMIT=600/m \\
        celery -A bench.celery_baseline worker -P threads -c 16

One task POSTs its chat-completions body to the upstream with httpx (not streaming) and keeps
nothing. Its ``rate_limit`` is Celery's own: a token bucket *per worker instance*
("not a global rate limit", docs/userguide/tasks.rst), so N workers let through up to N times
the limit. There is nothing for tokens per minute. A 429 or 5xx answer is retried the way the
docs show (``autoretry_for`` with ``retry_backoff``: 1, 2, 4, 8, 16 s caps with full jitter,
``max_retries`` 5); after that the job fails. Outcomes are counted in Redis
(``bench:celery:ok``, ``bench:celery:failed``, ``bench:celery:retried``) for the benchmark to read.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import httpx
import redis
from celery import Celery, Task

TASK_NAME = "bench.chat"
OK_KEY, FAILED_KEY, RETRIED_KEY = "bench:celery:ok", "bench:celery:failed", "bench:celery:retried"
MAX_RETRIES = 5


class UpstreamBusy(Exception):
    """The upstream said 429 or 5xx: worth another try later."""


# What every plain-Celery baseline app is configured with (bench/celery_plain.py adds late acks).
PLAIN_CONF = {
    "task_serializer": "json",
    "accept_content": ["json"],
    "task_ignore_result": True,
    "broker_connection_retry_on_startup": True,
    "worker_hijack_root_logger": False,
}


def make_app(broker_url: str, base_url: str = "", rate_limit: str | None = None, api_key: str = "sk-bench") -> Celery:
    app = Celery("bench_baseline", broker=broker_url, set_as_current=False)
    app.conf.update(PLAIN_CONF)
    local = threading.local()
    counters = redis.Redis.from_url(broker_url)

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(
                base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=httpx.Timeout(60.0)
            )
        return local.client  # type: ignore[no-any-return]

    class Counted(Task):  # type: ignore[misc]
        def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
            counters.incr(OK_KEY)

        def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
            counters.incr(FAILED_KEY)

        def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
            counters.incr(RETRIED_KEY)

    @app.task(  # type: ignore[untyped-decorator]
        name=TASK_NAME,
        shared=False,  # one app per call of make_app: the producer's must not replace the worker's task
        base=Counted,
        rate_limit=rate_limit,
        autoretry_for=(UpstreamBusy, httpx.TransportError),
        retry_backoff=True,
        retry_jitter=True,
        max_retries=MAX_RETRIES,
    )
    def chat(request: dict[str, Any]) -> None:
        response = client().post("/chat/completions", json=request)
        if response.status_code == 429 or response.status_code >= 500:
            raise UpstreamBusy(f"{response.status_code}: {response.text[:200]}")
        response.raise_for_status()

    return app


# What `celery -A bench.celery_baseline worker` loads; the benchmark sets these for each worker.
app = make_app(
    os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"),
    os.environ.get("BENCH_BASE_URL", ""),
    os.environ.get("BENCH_RATE_LIMIT") or None,
)
