"""Shared fixtures: a real redis-server, the simulator over HTTP, an embedded worker.

Fixtures and hooks only: what tests share that is not a fixture is in tests/helpers.py.
Nothing is mocked: the suite starts redis-server from PATH on a free port, serves the
simulator on another, and runs the worker's real Celery consumer in a thread. Jobs are keyed
by fresh uuids, so tests share one Redis without flushing it between tests (a flush would also
drop kombu's queue bindings under a running consumer); a test that needs an empty keyspace
takes its own prefix.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery.contrib.testing.worker import start_worker

from harness import RABBITMQ_MISSING, RabbitMQServer, RedisServer, rabbitmq_binary
from producers import Client
from simulator import SimConfig, SimServer
from tests.helpers import SLOW_SIM, make_settings
from worker.app import create_app
from worker.loop import stop_all
from worker.settings import Settings


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("MOONQ_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow; run with MOONQ_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMQServer]:
    """A private RabbitMQ node (own node name, free ports, temporary data; no plugins), stopped at the end.

    Never the machine's own RabbitMQ. Skipped only where rabbitmq-server is not installed (CI installs it).
    """
    if rabbitmq_binary() is None:
        assert not os.environ.get("CI"), "CI must install rabbitmq-server (.ci/run)"
        pytest.skip(RABBITMQ_MISSING)
    with RabbitMQServer() as server:
        yield server


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def sim() -> Iterator[SimServer]:
    with SimServer(SimConfig(seed=1)) as server:
        yield server


@pytest.fixture(scope="module")
def slow_sim() -> Iterator[SimServer]:
    """The simulator at about 4 s per answer (``SLOW_SIM``), for jobs still streaming when a test acts."""
    with SimServer(SLOW_SIM) as server:
        yield server


@pytest.fixture(scope="session")
def settings(redis_url: str, sim: SimServer) -> Settings:
    return make_settings(redis_url, moonshot_base_url=sim.base_url, concurrency=16)


@pytest.fixture(scope="session")
def worker(settings: Settings) -> Iterator[Any]:
    app = create_app(settings)
    with start_worker(
        app,
        pool="threads",
        concurrency=settings.concurrency,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=20,
    ) as w:
        yield w
    stop_all()


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings=settings) as c:
        yield c


@pytest.fixture
def run(client: Client, worker: Any) -> Any:
    """Submit a request to the running worker and wait for its job to end; returns the Job."""

    def _run(request: dict[str, Any], timeout: float = 20.0) -> Any:
        job = client.submit(request)
        events = list(job.events())
        assert events and events[-1].terminal, events
        job.collected = events  # type: ignore[attr-defined]  # the tests read back the events waited for
        return job

    return _run


@pytest.fixture
def fresh_prefix(redis_url: str) -> Settings:
    """Settings with a prefix no other test uses: an empty keyspace and a queue nobody consumes."""
    return make_settings(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
