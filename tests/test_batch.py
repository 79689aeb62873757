"""`moonq batch`: batch line format in and out, invalid lines answered, resume without resending."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from console.batch import run_batch
from harness import WorkerProcess
from producers import Client
from simulator import SimConfig, SimServer
from tests.helpers import node_env
from worker.settings import Settings


def line(i: int, **body: object) -> str:
    request = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": f"Question {i}"}], **body}
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": request})


@pytest.fixture
def paced_sim() -> Iterator[SimServer]:
    # ~0.3 s per answer, so a run can be interrupted half-way.
    with SimServer(SimConfig(seed=9, chunk_interval_s=0.02, tokens_per_chunk=1, answer_tokens=(15, 15))) as sim:
        yield sim


def batch(env: dict[str, str], src: Path, dst: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "console.cli", "batch", str(src), "-o", str(dst), *extra],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(240)  # two real processes and ~60 paced jobs; slow under a loaded CI machine
def test_batch_output_shape_errors_and_resume(tmp_path: Path, fresh_prefix: Settings, paced_sim: SimServer) -> None:
    n = 60
    lines = [line(i) for i in range(n)]
    lines[5] = line(5, temperature="hot")  # our validation: answered as an error line, never sent
    lines[7] = line(7, sim={"fault": "quota"})  # upstream 429 quota: a response with its status
    lines.insert(10, "this is not json")
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    env = {**node_env(fresh_prefix, paced_sim.base_url), "MOONQ_CONCURRENCY": "8"}
    with WorkerProcess(env):
        first = batch(env, src, dst, "--window", "10")
        deadline = time.monotonic() + 30
        while (not dst.exists() or len(dst.read_text().splitlines()) < 15) and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)  # interrupted mid-run, jobs in flight
        first.communicate()
        partial = len(dst.read_text().splitlines())
        assert 15 <= partial < n
        second = batch(env, src, dst)
        try:
            _, err = second.communicate(timeout=180)
        finally:
            if second.poll() is None:
                second.kill()
                second.communicate()
        assert second.returncode == 0, err
    rows = [json.loads(x) for x in dst.read_text().splitlines() if x.strip()]
    ids = [r["custom_id"] for r in rows]
    assert sorted(ids) == sorted([f"req-{i}" for i in range(n)] + ["line-11"])  # each exactly once
    by_id = {r["custom_id"]: r for r in rows}
    ok = by_id["req-0"]
    assert ok["response"]["status_code"] == 200 and ok["error"] is None
    assert ok["response"]["body"]["object"] == "chat.completion" and ok["response"]["body"]["choices"]
    assert by_id["req-5"]["response"] is None and "temperature" in by_id["req-5"]["error"]["message"]
    assert by_id["line-11"]["error"]["code"] == "invalid_request"
    quota = by_id["req-7"]["response"]
    assert quota["status_code"] == 429 and quota["body"]["error"]["type"] == "exceeded_current_quota_error"
    # Nothing answered twice upstream: jobs in flight at the kill were picked up by idempotency key.
    stats = paced_sim.stats()
    assert stats["by_status"].get("200", 0) == n - 2
    assert "ETA" in err


def test_bounded_window_and_no_worker_needed_for_invalid_lines(tmp_path: Path, fresh_prefix: Settings) -> None:
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"custom_id": "a", "body": {"model": "m", "messages": []}}\n{"nope": 1}\n')
    env = {"REDIS_URL": fresh_prefix.redis_url, "MOONQ_PREFIX": fresh_prefix.prefix}
    done = batch(env, src, dst)
    _, err = done.communicate(timeout=30)
    assert done.returncode == 0, err
    rows = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == ["a", "line-2"]
    assert all(r["error"]["code"] == "invalid_request" for r in rows)


def test_duplicates_answered_once_and_a_finished_run_resumes_to_nothing(
    tmp_path: Path, client: Client, worker: Any, r: redis.Redis
) -> None:
    """Duplicate custom_ids are found in the run's Redis set (not a set in the process), deleted at the end."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [line(0), line(1), line(0), line(1, temperature=0.5), "not json", line(2)]
    src.write_text("\n".join(lines) + "\n")
    assert run_batch(client, src, dst, window=2, poll_s=0.05) == (4, 1)
    rows = [json.loads(x) for x in dst.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in rows) == ["line-5", "req-0", "req-1", "req-2"]
    assert not r.keys(f"{client.keys.prefix}:batch:*")
    assert run_batch(client, src, dst, poll_s=0.05) == (0, 0)
    assert len(dst.read_text().splitlines()) == 4
