"""The product as users start it: the real `celery -A worker worker` process, the `moonq` CLI, `moonq demo`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from harness import WorkerProcess
from producers import Client, JobFailed
from simulator import SimServer
from tests.helpers import API_KEY, real_celery_worker_process_runs_jobs
from worker.settings import Settings

USER = {"role": "user", "content": "Hello from a real worker process"}


@pytest.fixture
def node(fresh_prefix: Settings, sim: SimServer) -> Iterator[WorkerProcess]:
    # Its own prefix: the embedded test worker must not take these jobs. No liveness overrides:
    # this is the node exactly as users start it.
    env = {
        "REDIS_URL": fresh_prefix.redis_url,
        "MOONQ_PREFIX": fresh_prefix.prefix,
        "MOONSHOT_BASE_URL": sim.base_url,
        "MOONSHOT_API_KEY": API_KEY,
    }
    with WorkerProcess(env) as proc:
        yield proc


def test_real_celery_worker_process_runs_jobs(node: WorkerProcess, fresh_prefix: Settings) -> None:
    real_celery_worker_process_runs_jobs(node, fresh_prefix)


def moonq(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "console.cli", *args],
        env={**os.environ, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_submit_streams_then_status_and_result(worker: Any, settings: Settings) -> None:
    env = {"REDIS_URL": settings.redis_url}
    done = moonq("submit", "Say hi", "--model", "moonshot-v1-8k", env=env)
    assert done.returncode == 0, done.stderr
    job_id = done.stderr.split("[job ")[1].split("]")[0]
    with Client(settings=settings) as client:
        content = client.job(job_id).result().choices[0].message.content
    assert content is not None and done.stdout.strip() == content.strip()
    status = json.loads(moonq("status", job_id, env=env).stdout)
    assert status["status"] == "succeeded" and status["attempt"] == "1"
    result = json.loads(moonq("result", job_id, env=env).stdout)
    assert result["choices"][0]["message"]["content"] == content
    events = [json.loads(line) for line in moonq("follow", job_id, "--json", env=env).stdout.splitlines()]
    assert events[-1]["type"] == "completed" and [e["seq"] for e in events] == list(range(1, len(events) + 1))


def test_cli_submit_file_and_errors(worker: Any, settings: Settings) -> None:
    env = {"REDIS_URL": settings.redis_url}
    request = {"model": "moonshot-v1-8k", "messages": [USER], "response_format": {"type": "json_object"}}
    done = moonq("submit", "--file", "-", "--no-wait", env=env, stdin=json.dumps(request))
    assert done.returncode == 0
    job_id = done.stdout.strip()
    with Client(settings=settings) as client:
        assert json.loads(client.job(job_id).result(timeout=20).choices[0].message.content or "")
    bad = moonq(
        "submit", "--file", "-", env=env, stdin=json.dumps({"model": "m", "messages": [], "stop": list("abcdef")})
    )
    assert bad.returncode == 2
    assert "messages:" in bad.stderr and "stop: at most 5 stop words" in bad.stderr
    missing = moonq("status", "no-such-job", env=env)
    assert missing.returncode == 3 and "no such job" in missing.stderr


def test_make_demo_runs_the_main_job_and_cleans_up() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MOONSHOT_API_KEY", "CELERY_BROKER_URL")}
    demo = subprocess.Popen(
        [sys.executable, "-m", "console.cli", "demo"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = demo.communicate(timeout=120)
    done = subprocess.CompletedProcess(demo.args, demo.returncode, stdout, stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    for section in ("Plain chat", "Tool call", "Tool result turn", "Partial Mode", "Thinking model", "Summary"):
        assert section in done.stdout
    assert "5 jobs" in done.stdout and "failed" not in done.stdout
    # The demo's worker (node name moonq-demo-<demo pid>@host) is gone with it.
    left = subprocess.run(["pgrep", "-f", f"moonq-demo-{demo.pid}@"], capture_output=True, text=True).stdout.split()
    assert left == []


def test_cli_dead_letters_retry_and_cancel(worker: Any, settings: Settings) -> None:
    env = {"REDIS_URL": settings.redis_url}
    key = uuid.uuid4().hex
    request = {"model": "moonshot-v1-8k", "messages": [USER], "sim": {"script": ["quota", "ok"], "key": key}}
    with Client(settings=settings) as client:
        job = client.submit(request)
        with pytest.raises(JobFailed):
            job.result(timeout=20)
        listed = json.loads(moonq("failed", "--json", env=env).stdout)
        assert job.id in [row["id"] for row in listed]
        new_id = moonq("retry", job.id, env=env).stdout.strip()
        assert client.job(new_id).result(timeout=20).choices[0].message.content
        assert job.id not in [row["id"] for row in json.loads(moonq("failed", "--json", env=env).stdout)]
        done = moonq("cancel", new_id, env=env)
        assert done.returncode == 0 and "already ended" in done.stdout
        bad = moonq("retry", new_id, env=env)
        assert bad.returncode == 2 and "only a failed or cancelled job can be retried" in bad.stderr
