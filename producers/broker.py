"""The Celery side shared by producers and workers: how messages are serialized and routed.

Producers build a minimal app from this to ``send_task`` by name; the worker's app starts
from the same dictionary, so the two can never disagree on serializer, queue or key prefix.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from producers.settings import ClientSettings


def broker_config(settings: ClientSettings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        # JSON only: a crafted message cannot carry a pickle that runs code.
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.queue,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # Every Redis key moonq writes starts with the prefix, the broker's too.
            "global_keyprefix": settings.keys.broker_prefix,
            # Ten priority lists, 0 the most urgent (Celery's default folds 10 levels into 4).
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),
        },
    }


def producer_app(settings: ClientSettings) -> Celery:
    app = Celery("moonq-producer", set_as_current=False)
    app.conf.update(broker_config(settings))
    return app
