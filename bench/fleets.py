"""The two systems under test, each as N real worker processes on one private Redis.

``MoonqFleet``: ``celery -A worker worker`` (``harness.WorkerProcess``) with moonq's
fleet limits in the environment; jobs go in with ``Client.submit_many``.
``CeleryFleet``: ``celery -A bench.celery_baseline worker`` with a per-worker ``rate_limit``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import redis
from celery import Celery

from bench import celery_baseline
from harness import WorkerProcess
from moonq.broker import producer_app
from moonq.record import JobField
from moonq.settings import ClientSettings
from producers import Client

REPO = Path(__file__).resolve().parent.parent
API_KEY = "sk-bench-0123456789abcdef"
# A node's own settings: nothing inherited from the shell may change what is measured.
_OWN_PREFIXES = ("MOONQ_", "MOONSHOT_", "REDIS_URL", "CELERY_", "BENCH_")


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}, **extra}


@contextmanager
def source_tree(rev: str | None) -> Iterator[Path]:
    """Where a node or gateway of git revision ``rev`` runs from: this checkout (None), or that revision's
    files (``git archive``) in a temporary directory, for a baseline measured in the same run."""
    if rev is None:
        yield REPO
        return
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    with tempfile.TemporaryDirectory(prefix="moonq-baseline-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp)


def node_env(redis_url: str, base_url: str, prefix: str, tree: Path = REPO, **extra: str) -> dict[str, str]:
    """A benchmark node's (or gateway's) environment: its Redis, prefix and upstream (the simulator), no
    /metrics port, started from ``tree`` (``tree_env``); ``extra``: more variables."""
    return clean_env(
        {
            "REDIS_URL": redis_url,
            "MOONQ_PREFIX": prefix,
            "MOONSHOT_BASE_URL": base_url,
            "MOONSHOT_API_KEY": API_KEY,
            "MOONQ_METRICS_PORT": "0",
            **tree_env(tree),
            **extra,
        }
    )


def tree_env(tree: Path) -> dict[str, str]:
    """The environment that makes a process started in ``tree`` import moonq from there."""
    return {} if tree == REPO else {"PYTHONPATH": str(tree)}


def wait_for_nodes(app: Celery, names: list[str], procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    """Block until every named node answers a ping on the broker."""
    deadline = time.monotonic() + 90
    seen: set[str] = set()
    while not set(names) <= seen:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"a worker exited ({proc.returncode}); its log:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers not ready after 90 s: {sorted(set(names) - seen)} missing")
        for reply in app.control.ping(timeout=0.5) or []:
            seen.update(reply)


def stop_all(procs: list[subprocess.Popen[bytes]], timeout_s: float = 30.0) -> None:
    """SIGTERM every process (Celery's warm shutdown), then SIGKILL what has not exited in time."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Fleet(Protocol):
    name: str

    def start(self) -> None: ...
    def enqueue(self, requests: list[dict[str, Any]]) -> None: ...
    def counts(self) -> tuple[int, int]: ...
    def stop(self) -> None: ...


class MoonqFleet:
    name = "moonq"

    def __init__(self, redis_url: str, base_url: str, limits_env: dict[str, str], nodes: int, log_dir: Path) -> None:
        self.settings = ClientSettings(redis_url=redis_url, prefix="bench")
        env = {
            "REDIS_URL": redis_url,
            "MOONQ_PREFIX": self.settings.prefix,
            "MOONSHOT_BASE_URL": base_url,
            "MOONSHOT_API_KEY": API_KEY,
            "MOONQ_METRICS_PORT": "0",
            **limits_env,
        }
        self.names = [f"moonq{i + 1}@bench" for i in range(nodes)]
        self.nodes = []
        for name in self.names:
            node = WorkerProcess(env, args=("-n", name), log_path=log_dir / f"{name.split('@')[0]}.log")
            node.env = clean_env(env)
            self.nodes.append(node)
        self.client: Client | None = None
        self.job_ids: list[str] = []

    def start(self) -> None:
        for node in self.nodes:
            node.start(wait=False)
        app = producer_app(self.settings)
        try:
            procs = [n.proc for n in self.nodes if n.proc is not None]
            wait_for_nodes(app, self.names, procs, [n.log_path for n in self.nodes])
        finally:
            app.close()
        self.client = Client(settings=self.settings)

    def enqueue(self, requests: list[dict[str, Any]]) -> None:
        assert self.client is not None
        self.job_ids = [job.id for job in self.client.submit_many(requests)]

    def counts(self) -> tuple[int, int]:
        """(succeeded, failed) jobs so far."""
        assert self.client is not None
        with self.client.redis.pipeline(transaction=False) as pipe:
            for job_id in self.job_ids:
                pipe.hget(self.client.keys.job(job_id), "status")
            statuses = pipe.execute()
        return statuses.count(b"succeeded"), statuses.count(b"failed")

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        stop_all([n.proc for n in self.nodes if n.proc is not None])


class CeleryFleet:
    """``celery -A bench.celery_baseline worker -P threads -c C --prefetch-multiplier M``, N times."""

    def __init__(
        self, redis_url: str, base_url: str, rate_limit: str, nodes: int, log_dir: Path, concurrency: int, prefetch: int
    ) -> None:
        self.name = f"celery rate_limit -c {concurrency} prefetch {prefetch}"
        self.worker_args = ["-P", "threads", "-c", str(concurrency), "--prefetch-multiplier", str(prefetch)]
        self.redis_url = redis_url
        self.env = clean_env(
            {"BENCH_BROKER_URL": redis_url, "BENCH_BASE_URL": base_url, "BENCH_RATE_LIMIT": rate_limit}
        )
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.names = [f"celery{i + 1}@bench" for i in range(nodes)]
        self.logs = [log_dir / f"{name.split('@')[0]}.log" for name in self.names]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.app = celery_baseline.make_app(redis_url)
        self.redis = redis.Redis.from_url(redis_url)

    def start(self) -> None:
        for name, log_path in zip(self.names, self.logs, strict=True):
            cmd = [sys.executable, "-m", "celery", "-A", "bench.celery_baseline", "worker"]
            cmd += [*self.worker_args, "-n", name, "--loglevel", "WARNING"]
            with log_path.open("ab") as log:
                self.procs.append(subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        wait_for_nodes(self.app, self.names, self.procs, self.logs)

    def enqueue(self, requests: list[dict[str, Any]]) -> None:
        with self.app.producer_or_acquire() as producer:
            for request in requests:
                self.app.send_task(celery_baseline.TASK_NAME, args=[request], producer=producer)

    def counts(self) -> tuple[int, int]:
        ok, failed = self.redis.mget(celery_baseline.OK_KEY, celery_baseline.FAILED_KEY)
        return int(ok or 0), int(failed or 0)

    def retried(self) -> int:
        return int(self.redis.get(celery_baseline.RETRIED_KEY) or 0)

    def stop(self) -> None:
        stop_all(self.procs)
        self.app.close()
        self.redis.close()


def first_chunk_stages(r: redis.Redis, prefix: str, requests: list[tuple[str, float, float]]) -> dict[str, list[float]]:
    """Where each streamed request's time to its first chunk went, from its job's record, in seconds:
    ``submit`` (sent -> enqueued by the gateway), ``queued`` (-> started by a node: its claim) and
    ``relay`` (-> the first chunk at the client). ``requests``: (job id, sent at (unix s), time to the
    first chunk (s)); one whose record lacks either stamp is left out."""
    keys = ClientSettings(prefix=prefix).keys
    with r.pipeline(transaction=False) as pipe:
        for job_id, _, _ in requests:
            pipe.hmget(keys.job(job_id), [JobField.ENQUEUED_AT, JobField.STARTED_AT])
        records = pipe.execute()
    out: dict[str, list[float]] = {"submit": [], "queued": [], "relay": []}
    for (_, sent, first_s), (enqueued, started) in zip(requests, records, strict=True):
        if enqueued is None or started is None:
            continue
        out["submit"].append(float(enqueued) - sent)
        out["queued"].append(float(started) - float(enqueued))
        out["relay"].append(first_s - (float(started) - sent))
    return out
