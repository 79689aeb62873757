"""``moonq top``: the arithmetic as tables, discovery against real Redis, and the command against a real node."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from redis.backoff import NoBackoff
from redis.retry import Retry

from console.fleetview import (
    Samples,
    Scrape,
    View,
    build_view,
    counter_delta,
    fleet,
    format_screen,
    histogram_quantile,
    human,
    node_delta,
    parse_exposition,
    total,
)
from console.top import discover, scrape_node
from gateway.console.fleet import describe, for_tenant
from harness import WorkerProcess, free_port
from moonq.keys import Keys
from producers import Client
from simulator import SimServer
from tests.helpers import make_settings, node_env

ROOT = Path(__file__).resolve().parent.parent
INF = math.inf


def s(name: str, value: float, **labels: str) -> Samples:
    """One sample, keyed as ``parse_exposition`` keys it."""
    return {(name, tuple(sorted(labels.items()))): value}


def hist(family: str, cumulative: list[tuple[float, float]], **labels: str) -> Samples:
    out: Samples = {}
    for le, count in cumulative:
        out |= s(f"{family}_bucket", count, le="+Inf" if le == INF else str(le), **labels)
    out |= s(f"{family}_count", cumulative[-1][1], **labels)
    return out


# --- histogram_quantile: hand-computed, Prometheus' rules -------------------------------------


@pytest.mark.parametrize(
    ("q", "cumulative", "expected"),
    [
        # rank 10 of 20 ends bucket (0.1, 0.5]: 0.1 + 0.4 * 10/10
        (0.5, [(0.1, 0), (0.5, 10), (1.0, 20), (INF, 20)], 0.5),
        # rank 19: 9 of the 10 in (0.5, 1]: 0.5 + 0.5 * 9/10
        (0.95, [(0.1, 0), (0.5, 10), (1.0, 20), (INF, 20)], 0.95),
        # rank 5: 5 of the 10 in (0.1, 0.5]: 0.1 + 0.4 * 5/10
        (0.25, [(0.1, 0), (0.5, 10), (1.0, 20), (INF, 20)], 0.3),
        # the first bucket starts at 0: rank 2 of 4 in (0, 1]
        (0.25, [(1.0, 4), (2.0, 8), (INF, 8)], 0.5),
        # rank 3 of 4 in (1, 2] (count 8 - 4): 1 + 1 * (6 - 4)/4
        (0.75, [(1.0, 4), (2.0, 8), (INF, 8)], 1.5),
        # a rank in +Inf gives the highest finite bound
        (0.5, [(1.0, 1), (2.5, 2), (INF, 10)], 2.5),
        # buckets summed over series can come in any order of bounds once sorted; one observation
        (0.95, [(0.025, 0), (0.05, 1), (INF, 1)], 0.025 + 0.025 * 0.95),
        # a first bucket with a bound <= 0 answers that bound
        (0.5, [(0.0, 5), (1.0, 10), (INF, 10)], 0.0),
        # no observations, no +Inf bucket, a single bucket: nothing to say
        (0.5, [(1.0, 0), (INF, 0)], None),
        (0.5, [(1.0, 3), (2.0, 3)], None),
        (0.5, [(INF, 3)], None),
    ],
)
def test_histogram_quantile(q: float, cumulative: list[tuple[float, float]], expected: float | None) -> None:
    got = histogram_quantile(q, cumulative)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_histogram_quantile_refuses_a_quantile_outside_0_1() -> None:
    with pytest.raises(ValueError):
        histogram_quantile(0, [(1.0, 1), (INF, 1)])


# --- counters: deltas and resets --------------------------------------------------------------


@pytest.mark.parametrize(
    ("prev", "cur", "delta"),
    [(3, 5, 2), (5, 5, 0), (None, 5, 5), (10, 4, 4), (10, 0, 0)],  # 10 -> 4: the node restarted
)
def test_counter_delta(prev: float | None, cur: float, delta: float) -> None:
    assert counter_delta(prev, cur) == delta


def test_node_delta_takes_every_new_value_after_a_restart_and_leaves_gauges_out() -> None:
    family = "moonq_job_duration_seconds"
    prev = s("moonq_retries_total", 5, reason="timeout") | hist(family, [(1.0, 8), (INF, 10)])
    prev |= s("moonq_jobs_in_progress", 3)
    # Restarted: retries went down; the histogram grew past its old counts since the restart.
    cur = s("moonq_retries_total", 1, reason="timeout") | hist(family, [(1.0, 9), (INF, 12)])
    cur |= s("moonq_jobs_in_progress", 2)
    d = node_delta(prev, cur)
    assert total(d, "moonq_retries_total") == 1
    assert total(d, f"{family}_count") == 12 and total(d, f"{family}_bucket", le="1.0") == 9
    assert total(d, "moonq_jobs_in_progress") == 0 and not any(n == "moonq_jobs_in_progress" for n, _ in d)
    # Without the restart: plain differences, and a series new since the last scrape counts from 0.
    grown = hist(family, [(1.0, 9), (INF, 12)]) | s("moonq_retries_total", 7, reason="timeout")
    grown |= s("moonq_retries_total", 2, reason="worker_lost")
    d = node_delta(prev, grown)
    assert total(d, f"{family}_count") == 2 and total(d, "moonq_retries_total") == 4


def test_a_recreated_series_is_a_restart_even_when_no_counter_went_down() -> None:
    prev = s("moonq_jobs_total", 4, outcome="succeeded") | s("moonq_jobs_created", 1000.0, outcome="succeeded")
    cur = s("moonq_jobs_total", 6, outcome="succeeded") | s("moonq_jobs_created", 2000.0, outcome="succeeded")
    assert total(node_delta(prev, cur), "moonq_jobs_total") == 6
    assert total(node_delta(prev, cur | s("moonq_jobs_created", 1000.0, outcome="succeeded")), "moonq_jobs_total") == 2


# --- aggregation over nodes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "how", "labels", "expected"),
    [
        ("moonq_queue_depth", "max", {}, 7),  # every node reports the fleet's queue: not 14
        ("moonq_jobs_in_progress", "sum", {}, 7),  # per node: 3 + 4 (over both models of node b)
        ("moonq_ratelimit_limit", "max", {"limit": "rpm"}, 600),
        ("moonq_ratelimit_limit", "max", {"limit": "inflight"}, None),  # no node reports it: not 0
    ],
)
def test_fleet_aggregation(name: str, how: str, labels: dict[str, str], expected: float | None) -> None:
    a = s("moonq_queue_depth", 7, queue="q") | s("moonq_jobs_in_progress", 3, model="kimi-k2.5")
    b = s("moonq_queue_depth", 7, queue="q") | s("moonq_jobs_in_progress", 1, model="kimi-k2.5")
    b |= s("moonq_jobs_in_progress", 3, model="other") | s("moonq_ratelimit_limit", 600, limit="rpm")
    assert fleet([a, b], name, how, **labels) == expected


def node(jobs: float, tokens: float, durations: list[tuple[float, float]], **gauges: float) -> Samples:
    out = s("moonq_jobs_total", jobs, model="kimi-k2.5", outcome="succeeded")
    out |= s("moonq_tokens_total", tokens, model="kimi-k2.5", type="prompt")
    out |= s("moonq_tokens_total", tokens, model="kimi-k2.5", type="cached")  # part of prompt: not added
    out |= hist("moonq_job_duration_seconds", durations, model="kimi-k2.5", outcome="succeeded")
    for name, value in gauges.items():
        out |= s(f"moonq_{name}", value)
    return out


def test_view_from_two_scrapes_with_a_node_down_and_one_new() -> None:
    a, b, c, d = (f"http://{n}:9464/metrics" for n in "abcd")
    prev = Scrape(100.0, {a: node(10, 1000, [(1.0, 5), (INF, 10)]), b: node(5, 50, [(1.0, 5), (INF, 5)]), c: None})
    cur = Scrape(
        102.0,
        {
            a: node(14, 1600, [(1.0, 7), (INF, 14)], queue_depth=9, ratelimit_cooldown_seconds=0),
            b: None,  # down now: its numbers drop out, the rest still add up
            c: node(2, 100, [(1.0, 2), (INF, 2)], queue_depth=9),  # first seen: no baseline yet
            d: None,
        },
    )
    view = build_view(prev, cur)
    assert (view.nodes_up, view.nodes_known, view.down, view.new) == (2, 4, (b, d), 1)
    assert view.queue_depth == 9 and view.interval_s == 2.0
    assert view.jobs_per_s == 2.0 and view.outcomes_per_s == {"succeeded": 2.0}  # only a's 4 jobs
    assert view.tokens_per_min == 600 / 2 * 60
    # a's interval: 2 jobs <= 1 s, 2 above (in +Inf): p50 = rank 2 of 4 -> 1.0; p95 -> highest bound
    assert view.latency_s == (1.0, 1.0) and view.ttft_s == (None, None)
    lines = format_screen(view)
    assert "nodes       2 up / 4 known (1 new: in the rates from the next interval)" in lines
    assert f"down        {b}" in lines and f"down        {d}" in lines
    assert not any(line.startswith("cool-down") for line in lines)  # 0 s left: not shown


def test_screen_lines_with_limits_and_a_cooldown() -> None:
    view = View(
        at=0.0,
        interval_s=2.0,
        nodes_up=1,
        nodes_known=1,
        queue_depth=12,
        in_flight=3,
        inflight_cap=50,
        jobs_per_s=2.5,
        outcomes_per_s={"succeeded": 2.0, "failed": 0.5},
        tokens_per_min=45_250,
        tpm_limit=5_000_000,
        requests_per_min=150,
        rpm_limit=600,
        latency_s=(0.41, 1.2),
        ttft_s=(0.05, None),
        failed=1,
        retries={"engine_overloaded_error": 2, "timeout": 1},
        cost_per_hour=0.42,
        cost_total=0.0123,
        cooldown_s=3.21,
    )
    assert format_screen(view)[1:] == [
        "nodes       1 up / 1 known",
        "queue       12 waiting | in flight 3 / 50 cap",
        "throughput  2.50 jobs/s (succeeded 2.00/s, failed 0.50/s)",
        "tokens      45.2k/min of 5.0M TPM (0.9%)",
        "requests    150/min of 600 RPM (25.0%)",
        "latency     job p50 410 ms p95 1.20 s | first token p50 50 ms p95 -",
        "errors      1 failed | retries: engine_overloaded_error 2, timeout 1",
        "cost        $0.4200/h | $0.0123 since the nodes started",
        "cool-down   3.2 s left (upstream 429)",
    ]
    bare = format_screen(View(at=0.0, interval_s=2.0, nodes_up=0, nodes_known=0))
    assert "tokens      0/min (no TPM limit)" in bare and any(line.startswith("no nodes") for line in bare)


@pytest.mark.parametrize(
    ("x", "text"),
    [
        (0, "0"),
        (6000, "6000"),
        (0.25, "0.25"),
        (12.34, "12.3"),
        (152.5, "152"),
        (45_250, "45.2k"),
        (5e6, "5.0M"),
        (123_456_789, "123M"),
    ],
)
def test_human(x: float, text: str) -> None:
    assert human(x) == text


def test_parse_a_real_exposition() -> None:
    registry = CollectorRegistry()
    Counter("moonq_jobs", "", ["model", "outcome"], registry=registry).labels("kimi-k2.5", "succeeded").inc(3)
    Gauge("moonq_queue_depth", "", ["queue"], registry=registry).labels("moonq").set(4)
    Histogram("moonq_time_to_first_token_seconds", "", ["model"], buckets=(0.1, 1), registry=registry).labels(
        "kimi-k2.5"
    ).observe(0.5)
    samples = parse_exposition(generate_latest(registry).decode())
    assert total(samples, "moonq_jobs_total", outcome="succeeded") == 3
    assert total(samples, "moonq_queue_depth") == 4
    assert total(samples, "moonq_time_to_first_token_seconds_bucket", le="1.0") == 1
    with pytest.raises(ValueError):
        parse_exposition("<html>not metrics</html>")


def tenants_node(rounds: list[tuple[float, float]]) -> list[Samples]:
    """One node's scrapes, one per round of ``(alpha's jobs, beta's jobs)`` since the previous scrape: two
    tenants' jobs, tokens and cost, and the exporter's budget gauges (alpha has budgets, beta none)."""
    registry = CollectorRegistry()  # one registry: a scrape of a new one would read as a restarted node
    jobs = Counter("moonq_jobs", "", ["model", "outcome", "tenant"], registry=registry)
    tokens = Counter("moonq_tokens", "", ["model", "type", "tenant"], registry=registry)
    cost = Counter("moonq_cost_usd", "", ["model", "tenant"], registry=registry)
    spend = Gauge("moonq_tenant_spend", "", ["tenant", "unit"], registry=registry)
    budget = Gauge("moonq_tenant_budget", "", ["tenant", "unit"], registry=registry)
    budget.labels("alpha", "tokens").set(100_000)
    budget.labels("alpha", "usd").set(1.0)
    scrapes = []
    for jobs_a, jobs_b in rounds:
        jobs.labels("kimi-k2.5", "succeeded", "alpha").inc(jobs_a * 0.8)
        jobs.labels("kimi-k2.5", "failed", "alpha").inc(jobs_a * 0.2)
        jobs.labels("kimi-k2.5", "succeeded", "beta").inc(jobs_b)
        for tenant, n in (("alpha", jobs_a), ("beta", jobs_b)):
            tokens.labels("kimi-k2.5", "prompt", tenant).inc(100 * n)
            tokens.labels("kimi-k2.5", "completion", tenant).inc(50 * n)
            tokens.labels("kimi-k2.5", "cached", tenant).inc(100 * n)  # part of prompt: not added
            cost.labels("kimi-k2.5", tenant).inc(0.001 * n)
            spend.labels(tenant, "tokens").inc(150 * n)
            spend.labels(tenant, "usd").inc(0.001 * n)
        scrapes.append(parse_exposition(generate_latest(registry).decode()))
    return scrapes


def test_tenant_rows_show_each_tenants_interval_and_budget_left() -> None:
    url = "http://a:9464/metrics"
    before, now = tenants_node([(6, 2), (10, 2)])
    prev, cur = Scrape(100.0, {url: before}), Scrape(102.0, {url: now})
    view = build_view(prev, cur)
    assert [row.name for row in view.tenants] == ["alpha", "beta"]
    rows = [line for line in format_screen(view) if line.startswith("tenant ")]
    assert rows == [
        # alpha: 8 succeeded and 2 failed in 2 s; 10 x 150 tokens (prompt + completion) in 2 s = 45k/min;
        # $0.010 in 2 s = $18/h; left today: 100k - 16 x 150 tokens, $1 - $0.016.
        "tenant      alpha: 5.00 jobs/s (succeeded 4.00/s, failed 1.00/s) | 45.0k tokens/min | $18.0000/h"
        " | left today 97.6k of 100k tokens, $0.9840 of $1.0000",
        "tenant      beta: 1.00 jobs/s (succeeded 1.00/s) | 9000 tokens/min | $3.6000/h"
        " | no budget (today 600 tokens, $0.0040)",
    ]
    # The web console shows the same rows to operators, and none to a tenant's session (other tenants' usage).
    page = describe(view, cur, True, None)
    assert [(t["name"], t["throughput"], t["budget"]) for t in page["tenants"]] == [
        ("alpha", "5.00 jobs/s", "left today 97.6k of 100k tokens, $0.9840 of $1.0000"),
        ("beta", "1.00 jobs/s", "no budget (today 600 tokens, $0.0040)"),
    ]
    assert for_tenant(page)["tenants"] == []


def test_no_tenant_rows_for_the_default_tenant_alone_but_one_with_a_budget_shows() -> None:
    def only(tenant: str, n: float, budget: float | None = None) -> Samples:
        out = s("moonq_jobs_total", n, model="kimi-k2.5", outcome="succeeded", tenant=tenant)
        if budget is not None:
            out |= s("moonq_tenant_budget", budget, tenant=tenant, unit="tokens")
            out |= s("moonq_tenant_spend", 10, tenant=tenant, unit="tokens")
        return out

    url = "http://a:9464/metrics"
    plain = build_view(Scrape(0.0, {url: only("default", 1)}), Scrape(1.0, {url: only("default", 3)}))
    assert plain.jobs_per_s == 2 and plain.tenants == ()
    assert not any(line.startswith("tenant") for line in format_screen(plain))
    capped = build_view(Scrape(0.0, {url: only("solo", 1, 50)}), Scrape(1.0, {url: only("solo", 3, 50)}))
    assert [line for line in format_screen(capped) if line.startswith("tenant")] == [
        "tenant      solo: 2.00 jobs/s (succeeded 2.00/s) | 0 tokens/min | $0.0000/h | left today 40 of 50 tokens"
    ]


# Two nodes' limiter gauges with two accounts and a cap over both (account="all"): what each node's exporter
# reads from the same Redis keys, a moment apart (b scraped later: its windows hold one grant more).
POOL = """
# TYPE moonq_ratelimit_limit gauge
moonq_ratelimit_limit{account="main",limit="rpm"} 500
moonq_ratelimit_limit{account="main",limit="inflight"} 100
moonq_ratelimit_limit{account="spare",limit="rpm"} 200
moonq_ratelimit_limit{account="spare",limit="inflight"} 10
moonq_ratelimit_limit{account="all",limit="rpm"} 600
# TYPE moonq_ratelimit_available gauge
moonq_ratelimit_available{account="main",limit="rpm"} %(main_rpm)s
moonq_ratelimit_available{account="main",limit="inflight"} 97
moonq_ratelimit_available{account="spare",limit="rpm"} 200
moonq_ratelimit_available{account="spare",limit="inflight"} 10
moonq_ratelimit_available{account="all",limit="rpm"} %(all_rpm)s
# TYPE moonq_ratelimit_cooldown_seconds gauge
moonq_ratelimit_cooldown_seconds{account="main"} 2.4
moonq_ratelimit_cooldown_seconds{account="spare"} 0
# TYPE moonq_account_out_of_rotation_seconds gauge
moonq_account_out_of_rotation_seconds{account="main"} 0
moonq_account_out_of_rotation_seconds{account="spare"} 251.3
"""


def test_two_accounts_one_out_of_rotation_show_one_limits_row() -> None:
    a = parse_exposition(POOL % {"main_rpm": 120, "all_rpm": 220})
    b = parse_exposition(POOL % {"main_rpm": 119, "all_rpm": 219})
    urls = ("http://a:9464/metrics", "http://b:9464/metrics")
    nodes: dict[str, Samples | None] = dict(zip(urls, (a, b), strict=True))
    view = build_view(Scrape(0.0, nodes), Scrape(2.0, nodes))
    # The fleet's limits: the accounts added up (500 + 200 RPM) within the cap (600); 110 in-flight slots, no cap.
    assert (view.rpm_limit, view.inflight_cap, view.tpm_limit) == (600, 110, None)
    assert view.cooldown_s == 2.4  # the longest of any account's
    assert [line for line in format_screen(view) if line.startswith(("limits", "cool-down"))] == [
        # Max over nodes: every node reads the same keys, the later read is no truer than the earlier.
        "limits      main: rpm 120/500 free, inflight 97/100 free, cooldown 3s"
        " | spare: rpm 200/200 free, inflight 10/10 free, cooldown 0s OUT 4m12s"
        " | all: rpm 220/600 free",
    ]
    # The web console's limit cells take the fleet's: room now summed over the accounts, within the cap's.
    assert {
        row["name"]: row["available"] for row in describe(view, Scrape(2.0, {urls[0]: a}), True, None)["limits"]
    } == {
        "rpm": "220",
        "inflight": "107",
    }


# --- discovery and scraping, for real ---------------------------------------------------------


def test_discovery_takes_fresh_announcements_and_explicit_nodes(r: redis.Redis) -> None:
    keys = Keys(f"top{uuid.uuid4().hex[:6]}")
    now = time.time()
    r.zadd(keys.nodes, {"http://fresh:9464/metrics": now - 5, "http://stale:9464/metrics": now - 31})
    urls, note = discover(r, keys, ["http://fresh:9464/metrics", "http://given:1/metrics"], now)
    assert (urls, note) == (["http://fresh:9464/metrics", "http://given:1/metrics"], None)
    gone = redis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))
    urls, note = discover(gone, keys, ["http://given:1/metrics"], now)
    assert urls == ["http://given:1/metrics"] and note is not None and note.startswith("redis: no answer")


def test_a_node_that_does_not_answer_or_is_not_an_exporter_is_down(sim: SimServer) -> None:
    with httpx.Client(timeout=0.5) as http:
        assert scrape_node(http, f"http://127.0.0.1:{free_port()}/metrics") is None
        assert scrape_node(http, f"{sim.base_url}/nowhere") is None  # a 404


# --- the command ------------------------------------------------------------------------------


def moonq_top(redis_url: str, prefix: str, *args: str, **popen: Any) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "console.cli", "--redis-url", redis_url, "top", *args]
    return subprocess.Popen(cmd, env={**os.environ, "MOONQ_PREFIX": prefix}, cwd=ROOT, text=True, **popen)


def amount(text: str) -> float:
    """A number as ``human`` writes it: 950, 12.5k, 5.0M."""
    match = re.fullmatch(r"([\d.]+)([kMG]?)", text)
    assert match, text
    return float(match[1]) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[match[2]]


def test_top_once_shows_the_live_node_its_jobs_and_tokens(redis_url: str, sim: SimServer) -> None:
    settings = make_settings(
        redis_url, prefix=f"top{uuid.uuid4().hex[:6]}", metrics_port=free_port(), moonshot_base_url=sim.base_url
    )
    env = node_env(
        settings,
        sim.base_url,
        MOONQ_METRICS_PORT=str(settings.metrics_port),
        MOONQ_METRICS_HOST="127.0.0.1",
        MOONQ_RPM="6000",
        MOONQ_TPM="5000000",
    )
    dead = f"http://127.0.0.1:{free_port()}/metrics"
    request = {"model": "kimi-k2.5", "thinking": {"type": "disabled"}, "messages": [{"role": "user", "content": "Hi"}]}
    with WorkerProcess(env), Client(settings=settings) as client:
        deadline = time.monotonic() + 10
        while not client.redis.zrange(settings.keys.nodes, 0, -1):  # announced on its first heartbeat
            assert time.monotonic() < deadline, "the node never announced itself"
            time.sleep(0.05)
        top = moonq_top(
            redis_url,
            settings.prefix,
            "--once",
            "--interval",
            "1",
            "--node",
            dead,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 15
        while top.poll() is None and time.monotonic() < deadline:  # jobs all through both scrapes
            for job in [client.submit(request) for _ in range(4)]:
                job.result(timeout=20)
        out, err = top.communicate(timeout=10)
    assert top.returncode == 0, err
    lines = {line[:12].strip(): line[12:] for line in out.splitlines() if line}
    assert lines["nodes"] == "1 up / 2 known" and lines["down"] == dead, out
    jobs = re.fullmatch(r"([\d.]+) jobs/s \(succeeded ([\d.]+)/s\)", lines["throughput"])
    assert jobs and float(jobs[1]) > 0 and jobs[1] == jobs[2], out
    tokens = re.fullmatch(r"(\S+)/min of 5.0M TPM \(([\d.]+)%\)", lines["tokens"])
    assert tokens and amount(tokens[1]) > 0, out
    assert re.fullmatch(r"\S+/min of 6000 RPM \([\d.]+%\)", lines["requests"]) and "p50 -" not in lines["latency"]
    assert lines["errors"] == "0 failed | retries: none" and out.endswith("\n") and not out.endswith("\n\n")


def test_top_redraws_as_blocks_when_not_a_terminal_and_exits_0_on_ctrl_c(redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "top.out"
    with path.open("w") as out:
        top = moonq_top(redis_url, f"top{uuid.uuid4().hex[:6]}", "--interval", "0.2", stdout=out)
    deadline = time.monotonic() + 15
    while path.read_text().count("\n\n") < 2:  # two blocks, each followed by a blank line
        assert time.monotonic() < deadline and top.poll() is None, "no second block"
        time.sleep(0.05)
    top.send_signal(signal.SIGINT)
    assert top.wait(timeout=10) == 0
    first, second, *_ = path.read_text().split("\n\n")
    for block in (first, second):
        assert block.startswith("moonq top") and "0 up / 0 known" in block and "\x1b[" not in block
