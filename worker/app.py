"""The Celery app: defaults that suit long, I/O-bound calls, so ``celery -A worker worker`` needs no flags."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from moonq.broker import broker_config
from moonq.redisurl import is_sentinel_url, parse_sentinel_url
from moonq.settings import is_redis_url
from moonq.wire import TASK_NAME
from worker.exporter import start_exporter
from worker.loop import runtime_for, shutdown_all, stop_all, stop_for
from worker.settings import Settings

log = logging.getLogger("moonq.worker")

# Celery warns on every broker reconnect that it will one day cancel late-ack tasks on connection
# loss. moonq's tasks are meant to outlive a reconnect (see worker/transport.py), so we opt out on
# purpose ("worker_cancel_long_running_tasks_on_connection_loss": False) and drop the reminder.
warnings.filterwarnings("ignore", message=".*worker_cancel_long_running_tasks_on_connection_loss.*")


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for a node: the producers' broker settings plus how jobs run."""
    base = broker_config(settings)
    redis_broker = is_redis_url(settings.broker_url)
    # On RabbitMQ none of this applies: it hands a dead node's unacknowledged messages to another
    # consumer as soon as the node's connection drops (a killed process's socket closes at once).
    redelivery = {
        # Redelivery of a dead node's messages (see keepalive.py): after this many seconds without
        # a heartbeat, looked for every 2 s by any live node, instead of Redis' 1 h / 100 s defaults.
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": 2,
        "unacked_restore_throttle": 1,
        # A node killed while holding the restore mutex must not block redelivery for 5 minutes.
        "unacked_mutex_expire": 30,
    }
    # moonq's Redis transport (worker/transport.py), on Sentinel's pool for a redis+sentinel:// broker:
    # there, one broker URL (a failover list would make kombu switch to its own transport on an error)
    # and every sentinel in the transport options.
    transport, sentinel = "worker.transport:Transport", {}
    if is_sentinel_url(settings.broker_url):
        transport = "worker.transport:SentinelTransport"
        base["broker_url"] = base["broker_url"].split(";")[0]
        sentinel = {"sentinels": [list(address) for address in parse_sentinel_url(settings.broker_url).sentinels]}
    return {
        **base,
        **({"broker_transport": transport} if redis_broker else {}),
        "broker_transport_options": {
            **base["broker_transport_options"],
            **(redelivery if redis_broker else {}),
            **sentinel,
        },
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
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app whose one task runs moonq jobs under ``settings`` (default: from the environment)."""
    settings = settings or Settings()
    # Before the worker builds its task tracer, which reads the level once (worker/settings.py,
    # celery_success_log). The logger is the process's: an embedder's last app decides.
    trace_level = logging.NOTSET if settings.celery_success_log else logging.WARNING
    logging.getLogger("celery.app.trace").setLevel(trace_level)
    app = Celery("moonq", set_as_current=False)
    app.conf.update(celery_config(settings))

    @app.task(name=TASK_NAME, ignore_result=True, shared=False, bind=True)  # type: ignore[untyped-decorator]
    def run_job(task: Task, envelope: dict[str, Any]) -> str:
        # kombu puts the delivery tag in the message properties; keepalive.py keeps it from redelivery.
        tag = (task.request.properties or {}).get("delivery_tag")
        try:
            outcome = runtime_for(settings).run(envelope, tag)
        except Exception as err:
            # Not an upstream failure (those end the job): Redis gone for longer than the client's
            # retries, or a bug. Celery would ack a failed task and strand the job as "running";
            # back to the queue instead. The job's attempt budget bounds how often this can repeat.
            log.exception(
                "job %s: delivery aborted; requeued", envelope.get("job_id") if isinstance(envelope, dict) else None
            )
            raise Reject(f"delivery aborted: {err!r}", requeue=True) from err
        if outcome == "requeued":
            raise Reject("worker shutting down", requeue=True)
        return outcome

    app.moonq_settings = settings
    return app


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_node(sender: Any = None, **_: Any) -> None:
    # The runtime starts before the first job (its cancel listener and node heartbeat too), and so
    # does the node's /metrics endpoint.
    settings = getattr(getattr(sender, "app", None), "moonq_settings", None)
    if settings is None:
        return
    _nodes[str(getattr(sender, "hostname", ""))] = settings
    runtime_for(settings).metrics_url = start_exporter(settings)


# Worker hostname -> its settings: worker_shutting_down names only the hostname, and one process may
# embed several workers (tests), each of which must hand back its own jobs only.
_nodes: dict[str, Settings] = {}


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _requeue_running_jobs(sender: Any = None, **_: Any) -> None:
    # Warm shutdown (SIGTERM) would wait for every running stream to finish; hand them back instead.
    settings = _nodes.get(str(sender))
    if settings is None:
        shutdown_all()
    else:
        runtime_for(settings).shutdown()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_runtimes(sender: Any = None, **_: Any) -> None:
    # The runtime of the app whose worker stopped; all of them if it cannot be told (one app per process
    # in production, several in an embedding test process).
    settings = getattr(getattr(sender, "app", None), "moonq_settings", None)
    if settings is None:
        stop_all()
    else:
        stop_for(settings)
