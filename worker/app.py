"""The Celery app: defaults that suit long, I/O-bound calls, so ``celery -A worker worker`` needs no flags."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_shutdown

from producers.broker import broker_config
from producers.wire import TASK_NAME
from worker.runtime import runtime_for, stop_all
from worker.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for a node: the producers' broker settings plus how jobs run."""
    return {
        **broker_config(settings),
        # The job record in Redis is the result store; Celery's would only duplicate it.
        "task_ignore_result": True,
        # Ack after the job ends, so a node that dies mid-job leaves its message to be redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A node takes only what it can start: long jobs must not wait behind a busy node.
        "worker_prefetch_multiplier": 1,
        # Jobs wait on the network: many threads, each parked on its job's future (see runtime.py).
        "worker_pool": "threads",
        "worker_concurrency": settings.concurrency,
        "worker_hijack_root_logger": False,
    }


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app whose one task runs moonq jobs under ``settings`` (default: from the environment)."""
    settings = settings or Settings()
    app = Celery("moonq", set_as_current=False)
    app.conf.update(celery_config(settings))

    @app.task(name=TASK_NAME, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def run_job(envelope: dict[str, Any]) -> str:
        return runtime_for(settings).run(envelope)

    app.moonq_settings = settings
    return app


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_runtimes(**_: Any) -> None:
    stop_all()
