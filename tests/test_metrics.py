"""Metrics as Prometheus sees them: a real node's /metrics after real jobs, promtool, a real Prometheus."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import WorkerProcess, free_port, wait_for_port
from producers import Client, JobFailed
from simulator import SimServer
from tests.helpers import make_settings, node_env
from worker.exporter import RedisCollector
from worker.settings import Settings

USER = [{"role": "user", "content": "Count my tokens."}]
REQUESTS: list[dict[str, Any]] = [
    {"model": "moonshot-v1-8k", "messages": USER},
    {
        "model": "kimi-k2.6",
        "thinking": {"type": "disabled"},
        "temperature": 0.6,
        "prompt_cache_key": "m1",
        "messages": [{"role": "system", "content": "You are Kimi. " * 30}, *USER],
    },
    {
        "model": "kimi-k2.6",
        "thinking": {"type": "disabled"},
        "temperature": 0.6,
        "prompt_cache_key": "m1",
        "messages": [{"role": "system", "content": "You are Kimi. " * 30}, *USER],
    },
    {"model": "kimi-k2-thinking", "messages": USER, "max_completion_tokens": 2048},
    {
        "model": "kimi-k2.5",
        "thinking": {"type": "disabled"},
        "temperature": 0.6,
        "messages": USER,
        "sim": {"script": ["overload", "ok"], "key": uuid.uuid4().hex},
    },
]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(metrics: dict[tuple[str, Any], float], name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in metrics.items() if n == name and all((k, v2) in lab for k, v2 in labels.items()))


@pytest.fixture(scope="module")
def node_run(redis_url: str, sim: SimServer) -> Iterator[dict[str, Any]]:
    """One real node with limits and /metrics, after a mix of jobs; yields what the test needs."""
    settings = make_settings(
        redis_url, prefix=f"m{uuid.uuid4().hex[:6]}", metrics_port=free_port(), moonshot_base_url=sim.base_url
    )
    env = node_env(
        settings,
        sim.base_url,
        MOONQ_METRICS_PORT=str(settings.metrics_port),
        MOONQ_METRICS_HOST="127.0.0.1",
        MOONQ_RPM="6000",
        MOONQ_TPM="5000000",
        MOONQ_MAX_INFLIGHT="50",
    )
    with WorkerProcess(env) as node, Client(settings=settings) as client:
        results = [client.submit(r).result(timeout=30) for r in REQUESTS]
        failed = client.submit({"model": "kimi-k9-unknown", "messages": USER})
        with pytest.raises(JobFailed):
            failed.result(timeout=30)
        url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
        yield {"settings": settings, "results": results, "url": url, "text": httpx.get(url).text, "node": node}


def test_token_counters_equal_the_reported_usage(node_run: dict[str, Any]) -> None:
    m = samples(node_run["text"])
    usages = [r.usage.model_dump() for r in node_run["results"]]
    assert total(m, "moonq_tokens_total", type="prompt") == sum(u["prompt_tokens"] for u in usages)
    assert total(m, "moonq_tokens_total", type="completion") == sum(u["completion_tokens"] for u in usages)
    cached = sum(
        u.get("cached_tokens") or (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0 for u in usages
    )
    assert cached > 0 and total(m, "moonq_tokens_total", type="cached") == cached


def test_outcomes_retries_latency_and_bounded_labels(node_run: dict[str, Any]) -> None:
    m = samples(node_run["text"])
    assert total(m, "moonq_jobs_total", outcome="succeeded") == len(REQUESTS)
    assert total(m, "moonq_jobs_total", outcome="failed", model="other") == 1  # unknown model collapsed
    assert total(m, "moonq_jobs_total", tenant="default") == len(REQUESTS) + 1  # no tenants file: one tenant
    assert total(m, "moonq_retries_total", model="kimi-k2.5", reason="engine_overloaded_error") == 1
    assert total(m, "moonq_upstream_request_duration_seconds_count", status="200") == len(REQUESTS)
    assert total(m, "moonq_upstream_request_duration_seconds_count", status="429") == 1
    assert total(m, "moonq_upstream_request_duration_seconds_count", status="404") == 1
    assert total(m, "moonq_time_to_first_token_seconds_count") == len(REQUESTS)
    assert total(m, "moonq_job_duration_seconds_count") == len(REQUESTS) + 1
    assert total(m, "moonq_queue_wait_seconds_count") == len(REQUESTS) + 1
    assert total(m, "moonq_ratelimit_wait_seconds_count") == len(REQUESTS) + 2  # one call per attempt
    assert total(m, "moonq_cost_usd_total") > 0
    assert total(m, "moonq_jobs_in_progress") == 0
    assert not any("job_id" in dict(labels) for _, labels in m)


@pytest.fixture(scope="module")
def tenants_run(redis_url: str, sim: SimServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real node reading a tenants file of two tenants, after jobs of both and of a tenant the file does not name."""
    path = tmp_path_factory.mktemp("tenants") / "tenants.json"
    path.write_text(json.dumps({"tenants": {"a": {"tokens_sha256": []}, "b": {"tokens_sha256": []}}}))
    settings = make_settings(
        redis_url, prefix=f"mt{uuid.uuid4().hex[:6]}", metrics_port=free_port(), moonshot_base_url=sim.base_url
    )
    env = node_env(
        settings,
        sim.base_url,
        MOONQ_METRICS_PORT=str(settings.metrics_port),
        MOONQ_METRICS_HOST="127.0.0.1",
        MOONQ_TENANTS_FILE=str(path),
    )
    request = {"model": "moonshot-v1-8k", "messages": USER}
    configured = settings.model_copy(update={"tenants_file": str(path)})
    with WorkerProcess(env), Client(settings=configured) as client, Client(settings=settings) as unaware:
        usage = {
            tenant: [client.submit(request, tenant=tenant).result(timeout=30).usage for _ in range(n)]
            for tenant, n in (("a", 2), ("b", 1))
        }
        # A producer without the tenants file submits as ``default``, a name this node's file does not configure.
        usage["other"] = [unaware.submit(request).result(timeout=30).usage]
        text = httpx.get(f"http://127.0.0.1:{settings.metrics_port}/metrics").text
    return {"usage": usage, "metrics": samples(text)}


def test_jobs_tokens_cost_and_waits_carry_the_configured_tenant_and_other(tenants_run: dict[str, Any]) -> None:
    m, usage = tenants_run["metrics"], tenants_run["usage"]
    for tenant, jobs in usage.items():
        assert total(m, "moonq_jobs_total", outcome="succeeded", tenant=tenant) == len(jobs), tenant
        assert total(m, "moonq_tokens_total", type="prompt", tenant=tenant) == sum(u.prompt_tokens for u in jobs)
        assert total(m, "moonq_tokens_total", type="completion", tenant=tenant) == sum(
            u.completion_tokens for u in jobs
        )
        assert total(m, "moonq_queue_wait_seconds_count", tenant=tenant) == len(jobs), tenant
        assert total(m, "moonq_ratelimit_wait_seconds_count", tenant=tenant) == len(jobs), tenant
        assert total(m, "moonq_cost_usd_total", tenant=tenant) > 0, tenant
    # Bounded: the file's names and ``other``, never the name a record carried.
    assert {dict(labels)["tenant"] for _, labels in m if "tenant" in dict(labels)} == {"a", "b", "other"}


def test_queue_depth_and_limiter_headroom(node_run: dict[str, Any]) -> None:
    m = samples(node_run["text"])
    assert total(m, "moonq_queue_depth") == 0
    assert total(m, "moonq_ratelimit_limit", limit="rpm") == 6000
    assert total(m, "moonq_ratelimit_limit", limit="tpm") == 5_000_000
    assert total(m, "moonq_ratelimit_available", limit="inflight") == 50
    assert 6000 - len(REQUESTS) - 2 <= total(m, "moonq_ratelimit_available", limit="rpm") < 6000  # the window's grants
    assert ("moonq_ratelimit_cooldown_seconds", (("account", "default"),)) in m


def test_queue_depth_reads_the_broker_at_scrape_time(fresh_prefix: Settings) -> None:
    with Client(settings=fresh_prefix) as client:
        for p in (0, 5, 9):
            client.submit({"model": "m", "messages": USER}, priority=p)
    families = {f.name: f for f in RedisCollector(fresh_prefix).collect()}
    assert families["moonq_queue_depth"].samples[0].value == 3


def test_the_exposition_passes_promtool(node_run: dict[str, Any]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        assert not os.environ.get("CI"), "CI must install promtool (.ci/run: apt-get install prometheus)"
        pytest.skip("promtool not installed")
    done = subprocess.run([promtool, "check", "metrics"], input=node_run["text"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_real_prometheus_scrapes_the_node_and_answers_promql(node_run: dict[str, Any]) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        assert not os.environ.get("CI"), "CI must install prometheus (.ci/run)"
        pytest.skip("prometheus not installed")
    port = free_port()
    target = node_run["url"].removeprefix("http://").removesuffix("/metrics")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s"},
                    "scrape_configs": [{"job_name": "moonq", "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp}/data",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port, timeout_s=30)
            expected = total(samples(httpx.get(node_run["url"]).text), "moonq_tokens_total", type="prompt")
            query = 'sum(moonq_tokens_total{type="prompt"})'
            deadline = time.monotonic() + 30
            value = None
            while time.monotonic() < deadline:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}).json()
                result = answer.get("data", {}).get("result") or []
                if result:
                    value = float(result[0]["value"][1])
                    break
                time.sleep(0.5)
            assert value == expected
        finally:
            proc.terminate()
            proc.wait(timeout=10)
