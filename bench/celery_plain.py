"""Plain-Celery baselines for ``bench.perf``, on the same broker as moonq.

    BENCH_BROKER_URL=redis://... celery -A bench.celery_plain worker -P threads -c 64 --prefetch-multiplier 1
    BENCH_BROKER_URL=redis://... BENCH_BASE_URL=http://.../v1 celery -A bench.celery_plain worker

Two tasks:

- ``bench.noop`` does nothing but count itself done: what Celery alone costs per job, with the
  delivery settings moonq uses (late ack), so moonq's per-job overhead can be read against it.
- ``bench.openai_chat`` is what a plain Celery user writes: the official ``openai`` SDK in the
  task, ``stream=True``, every chunk read. Started with Celery's defaults (prefork, one process
  per core), it holds as many calls in flight as it has processes.

Each finished task adds one to ``bench:plain:done`` in the broker's Redis.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

from bench.celery_baseline import PLAIN_CONF

NOOP, OPENAI_CHAT = "bench.noop", "bench.openai_chat"
DONE_KEY = "bench:plain:done"


def make_app(broker_url: str, base_url: str = "", api_key: str = "sk-bench") -> Celery:
    app = Celery("bench_plain", broker=broker_url, set_as_current=False)
    app.conf.update(PLAIN_CONF, task_acks_late=True)
    state: dict[str, Any] = {}

    def counters() -> redis.Redis:
        # Made on first use, so each prefork child opens its own connection after the fork.
        if "redis" not in state:
            state["redis"] = redis.Redis.from_url(broker_url)
        return state["redis"]  # type: ignore[no-any-return]

    @app.task(name=NOOP, shared=False)  # type: ignore[untyped-decorator]
    def noop(request: dict[str, Any]) -> None:
        counters().incr(DONE_KEY)

    @app.task(name=OPENAI_CHAT, shared=False)  # type: ignore[untyped-decorator]
    def openai_chat(request: dict[str, Any]) -> None:
        from openai import OpenAI

        if "openai" not in state:
            state["openai"] = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60.0)
        stream = state["openai"].chat.completions.create(**request)
        for _chunk in stream:
            pass
        counters().incr(DONE_KEY)

    return app


# What `celery -A bench.celery_plain worker` loads; the benchmark sets these for each worker.
app = make_app(os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"), os.environ.get("BENCH_BASE_URL", ""))
