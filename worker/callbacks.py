"""Celery callbacks: a job's outcome sent as a task, by name, to the caller's own Celery workers.

A plain Celery app on ``MOONQ_CALLBACK_BROKER_URL`` (default: the node's broker URL), without
moonq's key prefix or priority lists, so the message lands where an ordinary Celery worker of the
caller's app looks: queue ``on_done_queue`` (default ``celery``), task ``on_done``, arguments
``(job_id, status, result_or_error)``, task id the delivery's id (moonq/webhooks.py). A send that
returned is in the broker (RabbitMQ: confirmed); one that raised is retried like a webhook.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from celery import Celery

from moonq.redisurl import is_sentinel_url, kombu_sentinel
from moonq.settings import is_amqp_url, url_scheme

# kombu's own retries of one publish are kept short: the delivery worker retries with backoff.
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


def callback_app(broker_url: str) -> Celery:
    """The plain app that sends callbacks: JSON, Celery's defaults otherwise."""
    app = Celery("moonq-callbacks", set_as_current=False)
    conf: dict[str, Any] = {
        "broker_url": broker_url,
        "task_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5.0,
    }
    if is_sentinel_url(broker_url):
        # kombu reads redis+sentinel:// as plain Redis: give it its own Sentinel form (moonq/redisurl.py).
        sentinel = kombu_sentinel(broker_url)
        conf["broker_url"] = sentinel.broker_url
        conf["broker_transport_options"] = sentinel.transport_options
        if sentinel.use_ssl is not None:
            conf["broker_use_ssl"] = sentinel.use_ssl
    elif url_scheme(broker_url) == "rediss":
        conf["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if is_amqp_url(broker_url):
        conf["broker_transport_options"] = {"confirm_publish": True}
    app.conf.update(conf)
    return app


class CallbackSender:
    """Sends callbacks from the node's loop; each publish runs in a thread (kombu is synchronous)."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self._app: Celery | None = None

    def _send(self, task: str, queue: str, args: list[Any], task_id: str) -> None:
        if self._app is None:
            self._app = callback_app(self.broker_url)
        self._app.send_task(task, args=args, queue=queue, task_id=task_id, retry=True, retry_policy=PUBLISH_RETRY)

    async def send(self, task: str, queue: str, args: list[Any], task_id: str) -> None:
        """Publish one callback; raises whatever the broker connection raised."""
        await asyncio.to_thread(self._send, task, queue, args, task_id)

    def close(self) -> None:
        if self._app is not None:
            self._app.close()
