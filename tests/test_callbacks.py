"""Celery callbacks (docs/webhooks.md): a job's end sent by name to the caller's own Celery worker.

The caller is a second, plain Celery app (tests/callback_app.py) run by a real ``celery worker``
process; moonq's node sends to it through ``MOONQ_CALLBACK_BROKER_URL`` (by default the broker URL,
without moonq's key prefix), at least once: a broker that refuses connections for a while only
delays the callback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from harness import TcpProxy, WorkerProcess
from moonq.deliveries import backlog
from moonq.settings import ClientSettings
from producers import Client
from simulator import SimServer
from tests.helpers import make_settings, node_env, wait_until
from tests.test_webhooks import FAST_DELIVERY

ROOT = Path(__file__).resolve().parents[1]
TASK = "myapp.tasks.handle_answer"
HELLO = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "Call me back."}]}


class CallerWorker:
    """``celery -A tests.callback_app worker`` on ``queues``, appending what it receives to a Redis list."""

    def __init__(self, broker_url: str, queues: list[str]) -> None:
        self.results = f"callback-results-{uuid.uuid4().hex[:8]}"
        self.broker_url = broker_url
        self.log = Path(tempfile.mkdtemp(prefix="moonq-caller-")) / "worker.log"
        env = {"CALLBACK_BROKER_URL": broker_url, "CALLBACK_RESULTS": self.results, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "celery", "-A", "tests.callback_app", "worker", "-Q", ",".join(queues)]
        cmd += ["--pool", "threads", "-c", "2", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
        wait_until(self._started, 30, "the caller's worker ready")
        assert self.proc.poll() is None, self.log.read_text()

    def _started(self) -> bool:
        return "ready." in self.log.read_text(errors="replace") or self.proc.poll() is not None

    def received(self, count: int, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        with redis.Redis.from_url(self.broker_url) as r:
            wait_until(lambda: r.llen(self.results) >= count, timeout_s, f"{count} callback(s) run")
            return [json.loads(x) for x in r.lrange(self.results, 0, -1)]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def queue() -> str:
    return f"answers-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def caller(redis_url: str, queue: str) -> Iterator[CallerWorker]:
    worker = CallerWorker(redis_url, [queue, "celery"])
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def client(redis_url: str, sim: SimServer) -> Iterator[Client]:
    """A moonq node on its own prefix; callbacks go to the broker URL (the same Redis), unprefixed."""
    settings = make_settings(redis_url, prefix=f"cb{uuid.uuid4().hex[:6]}")
    with WorkerProcess(node_env(settings, sim.base_url, **FAST_DELIVERY)):
        with Client(settings=ClientSettings(redis_url=redis_url, prefix=settings.prefix)) as c:
            yield c


def test_the_callers_own_celery_worker_runs_the_callback(client: Client, caller: CallerWorker, queue: str) -> None:
    job = client.submit(HELLO, on_done=TASK, on_done_queue=queue)
    answer = job.result(timeout=20)
    [got] = caller.received(1)
    assert (got["job_id"], got["status"], got["task_id"]) == (job.id, "succeeded", f"callback:{job.id}")
    assert got["outcome"]["choices"][0]["message"]["content"] == answer.choices[0].message.content
    wait_until(lambda: backlog(client.redis, client.keys)["queued"] == 0, 5, "the entry settled")
    time.sleep(0.5)
    assert len(caller.received(1)) == 1


def test_a_failed_job_sends_its_error_to_the_default_queue(client: Client, caller: CallerWorker) -> None:
    before = len(caller.received(0))
    job = client.submit({**HELLO, "sim": {"fault": "quota"}}, on_done=TASK)  # on_done_queue: celery
    got = caller.received(before + 1)[-1]
    assert (got["job_id"], got["status"]) == (job.id, "failed")
    assert got["outcome"]["status"] == 429 and got["outcome"]["type"]


def test_a_broker_that_refuses_connections_only_delays_the_callback(
    redis_url: str, sim: SimServer, caller: CallerWorker, queue: str
) -> None:
    target_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with TcpProxy(target_port) as proxy:
        proxy.refuse(30)
        settings = make_settings(redis_url, prefix=f"cbr{uuid.uuid4().hex[:5]}")
        env = node_env(settings, sim.base_url, MOONQ_CALLBACK_BROKER_URL=f"redis://127.0.0.1:{proxy.port}/0")
        env.update(FAST_DELIVERY)
        before = len(caller.received(0))
        with WorkerProcess(env), Client(settings=ClientSettings(redis_url=redis_url, prefix=settings.prefix)) as c:
            job = c.submit(HELLO, on_done=TASK, on_done_queue=queue)
            wait_until(lambda: backlog(c.redis, c.keys)["retrying"] == 1, 15, "the callback waiting to retry")
            assert len(caller.received(0)) == before
            proxy.heal()
            got = caller.received(before + 1)[-1]
            assert (got["job_id"], got["task_id"]) == (job.id, f"callback:{job.id}")
            wait_until(lambda: backlog(c.redis, c.keys) == {"queued": 0, "retrying": 0, "dead": 0}, 10, "settled")
