"""Tenants' daily budgets (docs/tenants.md): spent, a tenant's submits are refused and its queued jobs fail.

Real parts: a tenants file and a price file on disk, a real node (``celery -A worker worker``) that
reads both, the simulator (its request count shows what reached the upstream), the gateway over
HTTP, and the node's /metrics. Each tenant of the file plays one part, so the tests do not depend on
one another's spending.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import GatewaySettings
from harness import WorkerProcess, free_port
from moonq import budgets
from moonq.errors import TenantBudgetExceeded
from moonq.record import DEFAULT_TENANT
from moonq.settings import ClientSettings
from moonq.tenants import TenantConfig, hash_token
from producers import Client, JobFailed
from simulator import SimConfig, SimServer
from tests.helpers import active_count, node_env, serve_gateway, wait_until
from worker.settings import Settings

HELLO = [{"role": "user", "content": "Hello, budget."}]
KIMI = {"model": "kimi-k2.5", "messages": HELLO}
V1 = {"model": "moonshot-v1-8k", "messages": HELLO}
# $1000 per million tokens, every kind: a job's cost is its tokens / 1000 dollars.
PRICES = {"moonshot-v1-8k": {"input_cache_hit": 1000.0, "input_cache_miss": 1000.0, "output": 1000.0}}
TOKENS = {"tokens": "tokens-token", "free": "free-token"}
TENANTS = {
    "tokens": {"tokens_sha256": [hash_token(TOKENS["tokens"])], "daily_tokens": 1},
    "dollars": {"tokens_sha256": [], "daily_usd": 0.001},
    "queued": {"tokens_sha256": [], "daily_tokens": 1, "daily_usd": 100.0},
    "free": {"tokens_sha256": [hash_token(TOKENS["free"])]},
}


@dataclass
class Fleet:
    settings: ClientSettings
    sim: SimServer
    node: WorkerProcess
    metrics_url: str
    tmp: Path

    def client(self, tenant: str, **overrides: Any) -> Client:
        return Client(settings=self.settings.model_copy(update=overrides), tenant=tenant)

    def spend(self, r: redis.Redis, tenant: str) -> budgets.Spend:
        return budgets.Spend.from_redis(r.hmget(self.key(tenant), budgets.FIELDS))

    def key(self, tenant: str) -> str:
        return budgets.key(self.settings.prefix, tenant, budgets.utc_day(time.time()))


@pytest.fixture(scope="module")
def fleet(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One real node reading the tenants and price files, with /metrics, on its own simulator and prefix."""
    tmp = tmp_path_factory.mktemp("budgets")
    (tmp / "tenants.json").write_text(json.dumps({"tenants": TENANTS}))
    (tmp / "prices.json").write_text(json.dumps(PRICES))
    prefix, port = f"b{uuid.uuid4().hex[:6]}", free_port()
    settings = ClientSettings(redis_url=redis_url, prefix=prefix, tenants_file=str(tmp / "tenants.json"))
    with SimServer(SimConfig(seed=13)) as sim:
        env = node_env(
            Settings(redis_url=redis_url, prefix=prefix),
            sim.base_url,
            MOONQ_TENANTS_FILE=settings.tenants_file,
            MOONQ_PRICES_FILE=str(tmp / "prices.json"),
            MOONQ_METRICS_PORT=str(port),
            MOONQ_METRICS_HOST="127.0.0.1",
        )
        with WorkerProcess(env) as node:
            yield Fleet(settings, sim, node, f"http://127.0.0.1:{port}/metrics", tmp)


def test_a_spent_token_budget_refuses_the_tenants_submits(fleet: Fleet, r: redis.Redis) -> None:
    with fleet.client("tokens") as tokens, fleet.client("free") as free:
        first = tokens.submit(KIMI, idempotency_key="first")
        usage = first.result(timeout=20).usage
        assert usage is not None and usage.total_tokens > 1
        # Counted before the job's end is written: seen as soon as the result is.
        assert fleet.spend(r, "tokens").tokens == usage.total_tokens
        assert 0 < r.ttl(fleet.key("tokens")) <= budgets.TTL_S

        with pytest.raises(TenantBudgetExceeded) as refused:
            tokens.submit(KIMI)
        err = refused.value
        assert (err.type, err.tenant, err.unit, err.limit, err.spent) == (
            "tenant_budget_exceeded_error",
            "tokens",
            "tokens",
            1,
            usage.total_tokens,
        )
        assert f"tenant 'tokens' has spent its daily_tokens budget for {err.day} (UTC)" in str(err)
        with pytest.raises(TenantBudgetExceeded):
            tokens.submit_many([KIMI, KIMI])
        # The same idempotency key still finds its job: that starts nothing new.
        assert tokens.submit(KIMI, idempotency_key="first").id == first.id
        assert not active_count(tokens.redis, fleet.settings.keys)

        # Another tenant is not held back, and its spend is counted too.
        assert free.submit(KIMI).result(timeout=20).choices[0].finish_reason == "stop"
        assert fleet.spend(r, "free").tokens > 0


def test_the_gateway_answers_429_with_the_type(fleet: Fleet, r: redis.Redis) -> None:
    r.hincrby(fleet.key("tokens"), budgets.TOKENS, 1)  # spent, whether or not a test spent it already
    r.expire(fleet.key("tokens"), budgets.TTL_S)
    s = fleet.settings
    settings = GatewaySettings(redis_url=s.redis_url, prefix=s.prefix, tenants_file=s.tenants_file)
    with serve_gateway(settings) as base, httpx.Client(base_url=base) as http:
        for path in ("/v1/jobs", "/v1/chat/completions"):
            refused = http.post(path, json=KIMI, headers={"authorization": f"Bearer {TOKENS['tokens']}"})
            assert refused.status_code == 429, refused.text
            error = refused.json()["error"]
            assert error["type"] == "tenant_budget_exceeded_error"
            assert "tenant 'tokens'" in error["message"] and "daily_tokens" in error["message"]
            assert 0 < int(refused.headers["retry-after"]) <= 86400
        free = http.post("/v1/jobs", json=KIMI, headers={"authorization": f"Bearer {TOKENS['free']}"})
        assert free.status_code == 202


def test_a_spent_dollar_budget_refuses_at_the_nodes_prices(fleet: Fleet, r: redis.Redis) -> None:
    with fleet.client("dollars") as dollars:
        usage = dollars.submit(V1).result(timeout=20).usage
        assert usage is not None
        expected = (usage.prompt_tokens + usage.completion_tokens) / 1000  # PRICES: $1000 per million
        assert fleet.spend(r, "dollars").usd == pytest.approx(expected)
        with pytest.raises(TenantBudgetExceeded) as refused:
            dollars.submit(V1)
    assert (refused.value.unit, refused.value.limit) == ("usd", 0.001)
    assert refused.value.spent == pytest.approx(expected)
    assert "daily_usd budget" in str(refused.value) and "of $0.001;" in str(refused.value)


def test_queued_jobs_fail_without_calling_the_upstream_once_the_budget_is_spent(fleet: Fleet) -> None:
    """Jobs parked on a queue no node reads; the budget is then spent; a node for that queue fails them."""
    with fleet.client("queued", queue="parked") as parked, fleet.client("queued") as queued:
        waiting = [parked.submit(KIMI), parked.submit(V1)]
        queued.submit(KIMI).result(timeout=20)  # spends the budget, on the node that reads the usual queue
        before = fleet.sim.stats()["requests"]
        env = {**fleet.node.env, "MOONQ_QUEUE": "parked", "MOONQ_METRICS_PORT": "0"}
        with WorkerProcess(env):  # its ping may be answered by the first node: wait for the jobs instead
            for job in waiting:
                with pytest.raises(JobFailed) as failed:
                    job.result(timeout=30)
                assert failed.value.error["type"] == "tenant_budget_exceeded_error"
                assert failed.value.error["status"] == 429 and "tenant 'queued'" in failed.value.error["message"]
                assert [e.type for e in job.events()] == ["failed"]
        assert fleet.sim.stats()["requests"] == before
        # A re-run is a new job: refused like any other submit.
        with pytest.raises(TenantBudgetExceeded):
            queued.retry(waiting[0].id)


def test_the_node_exports_spend_and_budgets(fleet: Fleet, r: redis.Redis) -> None:
    with fleet.client("free") as free:
        free.submit(KIMI).result(timeout=20)
    spent = fleet.spend(r, "free")

    def scrape() -> dict[tuple[str, str, str], float]:
        out = {}
        for family in text_string_to_metric_families(httpx.get(fleet.metrics_url).text):
            for s in family.samples:
                if s.name in ("moonq_tenant_spend", "moonq_tenant_budget"):
                    out[(s.name, s.labels["tenant"], s.labels["unit"])] = s.value
        return out

    wait_until(lambda: bool(scrape()), 10, "the node's /metrics")
    got = scrape()
    assert got[("moonq_tenant_spend", "free", "tokens")] == spent.tokens > 0
    assert got[("moonq_tenant_spend", "free", "usd")] == pytest.approx(spent.usd)
    budgets_set = {(tenant, unit): v for (name, tenant, unit), v in got.items() if name == "moonq_tenant_budget"}
    configured = {("tokens", "tokens"): 1, ("dollars", "usd"): 0.001, ("queued", "tokens"): 1, ("queued", "usd"): 100}
    assert budgets_set == configured
    assert {tenant for _, tenant, _ in got} == set(TENANTS)  # configured names only


def test_without_a_tenants_file_nothing_is_read_or_counted(run: Any, settings: Settings, r: redis.Redis) -> None:
    """The default tenant has no budget: its jobs leave no budget key (and its submits read none)."""
    job = run(KIMI)
    assert job.status() == "succeeded"
    # Its tenant's key only: tests of other files count other tenants' spend under the same prefix.
    assert not list(r.scan_iter(budgets.key(settings.prefix, DEFAULT_TENANT, "*")))


def test_a_budget_is_spent_once_the_spend_reaches_it() -> None:
    config = TenantConfig(tokens_sha256=[], daily_tokens=100, daily_usd=1.0)
    budgets.check("t", config, budgets.Spend(99, 0.99), "2026-01-01")
    for spend, unit in ((budgets.Spend(100, 5.0), "tokens"), (budgets.Spend(0, 1.0), "usd")):
        with pytest.raises(TenantBudgetExceeded) as refused:
            budgets.check("t", config, spend, "2026-01-01")
        assert refused.value.unit == unit
    budgets.check("t", TenantConfig(tokens_sha256=[]), budgets.Spend(10**9, 10**6), "2026-01-01")
    assert budgets.limits(TenantConfig(tokens_sha256=[])) == {}
    assert budgets.Spend.from_redis([None, None]) == budgets.Spend()


def test_the_day_is_the_utc_day() -> None:
    midnight = 1_767_225_600  # 2026-01-01T00:00:00Z
    assert budgets.utc_day(midnight - 1) == "2025-12-31"
    assert budgets.utc_day(midnight) == "2026-01-01"
    assert budgets.seconds_to_midnight(midnight - 1) == 1
    assert budgets.seconds_to_midnight(midnight) == 86400
    assert budgets.key("moonq", "search", "2026-01-01") == "moonq:budget:search:2026-01-01"
