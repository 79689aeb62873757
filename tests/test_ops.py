"""The operations artefacts in ops/: Prometheus config, alert rules and their unit tests, the Grafana dashboard.

promtool checks the config and the rules and runs the rules' unit tests. A throwaway Prometheus (no
scrape targets, a temporary TSDB, the rule files loaded) answers every dashboard query and rule
expression, so a parse or type error fails here rather than on a wall screen; it also formats each
expression, from which the metric names are read and checked against the families a node exports.
A renamed metric therefore breaks a test. Grafana itself is not run: the dashboard is checked
structurally.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "ops" / "prometheus"
CONFIG = PROM_DIR / "prometheus.yml"
RULE_FILES = [PROM_DIR / "moonq-rules.yml", PROM_DIR / "moonq-alerts.yml"]
RULE_TESTS = PROM_DIR / "tests" / "moonq-alerts.test.yml"
GRAFANA_DIR = ROOT / "ops" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "moonq.json"
DS_PROVISIONING = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVISIONING = GRAFANA_DIR / "provisioning" / "dashboards" / "moonq.yml"

# What a node exports (worker/metrics.py, worker/exporter.py), plus Prometheus' own `up`.
COUNTERS = {"moonq_jobs_total", "moonq_tokens_total", "moonq_cost_usd_total", "moonq_retries_total"}
COUNTERS |= {"moonq_webhook_deliveries_total", "moonq_webhook_attempts_total"}
HISTOGRAMS = {
    "moonq_upstream_request_duration_seconds",
    "moonq_time_to_first_token_seconds",
    "moonq_job_duration_seconds",
    "moonq_queue_wait_seconds",
    "moonq_ratelimit_wait_seconds",
    "moonq_webhook_latency_seconds",
}
GAUGES = {
    "moonq_jobs_in_progress",
    "moonq_queue_depth",
    "moonq_ratelimit_limit",
    "moonq_ratelimit_available",
    "moonq_ratelimit_cooldown_seconds",
    "moonq_account_out_of_rotation_seconds",
    "moonq_redis_memory_bytes",
    "moonq_webhook_backlog",
    "moonq_tenant_spend",
    "moonq_tenant_budget",
    "moonq_tenant_limit",
    "moonq_tenant_available",
    "moonq_jobs_waiting",
}
SERIES = COUNTERS | GAUGES | {f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "count", "sum")} | {"up"}
ALERTS = {
    "MoonqNoWorkersUp",
    "MoonqHighErrorRate",
    "MoonqRetryStorm",
    "MoonqQueueGrowing",
    "MoonqP95LatencyHigh",
    "MoonqQuotaSaturation",
    "MoonqUpstreamCooldown",
    "MoonqAccountOutOfRotation",
    "MoonqCostBurn",
    "MoonqRedisMemoryHigh",
    "MoonqWebhooksFailing",
}

# Grafana's variables as the test Prometheus should see them; an unknown variable fails the test.
VARIABLES = {"model": ".*", "__rate_interval": "5m", "__interval": "1m", "__range": "1h", "__range_s": "3600"}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install {name} (.ci/run: apt-get install prometheus)")
        pytest.skip(f"{name} not installed")
    return path


def promtool(*args: str) -> None:
    done = subprocess.run([binary("promtool"), *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A real Prometheus on a free port with no targets, a temporary TSDB and the moonq rule files."""
    exe = binary("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(json.dumps({"rule_files": [str(p) for p in RULE_FILES], "scrape_configs": []}))
    port = free_port()
    with (tmp / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                exe,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, timeout_s=20)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 20
            while not (client.get("/-/ready").status_code == 200 and rule_groups(client)):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp / "prometheus.log").read_text()
                time.sleep(0.05)
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rule_groups(client: httpx.Client) -> list[dict[str, Any]]:
    answer = client.get("/api/v1/rules").json()
    assert answer["status"] == "success", answer
    groups: list[dict[str, Any]] = answer["data"]["groups"]
    return groups


def all_rules(client: httpx.Client) -> list[dict[str, Any]]:
    return [rule for group in rule_groups(client) for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    return [(p["title"], t["expr"]) for p in panels(board) for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        assert name in VARIABLES, f"unknown template variable ${name} in {expr!r}"
        return VARIABLES[name]

    return VARIABLE.sub(value, expr)


def template_queries(text: str) -> list[str]:
    """PromQL inside alert annotation templates: {{ query `...` }} or {{ query "..." }}."""
    return [a or b for a, b in re.findall(r'query\s+(?:`([^`]*)`|"((?:[^"\\]|\\.)*)")', text)]


FUNCTION_OR_KEYWORD = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(client: httpx.Client, expr: str) -> set[str]:
    """Metric names an expression selects, read off Prometheus' own formatting of it."""
    answer = client.get("/api/v1/format_query", params={"query": expr}).json()
    assert answer["status"] == "success", (expr, answer)
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', "", answer["data"])  # strings
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)  # label matchers, ranges, subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        if match.group(2) is None and match.group(1).lower() not in FUNCTION_OR_KEYWORD:
            names.add(match.group(1))
    return names


def assert_evaluates(client: httpx.Client, expr: str, where: str) -> None:
    answer = client.get("/api/v1/query", params={"query": expr}).json()
    assert answer["status"] == "success", f"{where}: {expr!r} -> {answer.get('errorType')}: {answer.get('error')}"


# ---- promtool ---------------------------------------------------------------------------------


def test_the_prometheus_config_and_the_rule_files_it_names_pass_promtool() -> None:
    promtool("check", "config", str(CONFIG))


def test_the_rule_files_pass_promtool() -> None:
    promtool("check", "rules", *map(str, RULE_FILES))


def test_the_alert_unit_tests_pass() -> None:
    promtool("test", "rules", str(RULE_TESTS))


def test_every_alert_has_a_test_where_it_fires_and_one_where_it_does_not() -> None:
    """Reads the unit-test file's `alertname:` / `exp_alerts:` pairs (no YAML parser in the venv)."""
    text = RULE_TESTS.read_text()
    fires: set[str] = set()
    quiet: set[str] = set()
    for name, expected in re.findall(r"alertname:\s*(\w+)\s*\n\s*exp_alerts:([^\n]*)", text):
        (quiet if expected.strip() == "[]" else fires).add(name)
    assert ALERTS - fires == set(), "alerts with no firing test"
    assert ALERTS - quiet == set(), "alerts with no test where they stay quiet"


def test_the_scrape_job_is_the_one_the_alerts_name() -> None:
    assert re.search(r"^\s*-\s*job_name:\s*moonq\s*$", CONFIG.read_text(), re.M)


# ---- rules, through a real Prometheus ---------------------------------------------------------


def test_every_alert_is_loaded_with_a_severity_a_summary_and_a_description(prometheus: httpx.Client) -> None:
    alerts = [r for r in all_rules(prometheus) if r["type"] == "alerting"]
    assert {a["name"] for a in alerts} == ALERTS
    for alert in alerts:
        assert alert["labels"].get("severity") in {"critical", "warning"}, alert["name"]
        assert alert["annotations"].get("summary"), alert["name"]
        assert len(alert["annotations"].get("description", "")) > 80, f"{alert['name']}: say what to do"


def test_rules_read_only_exported_families_and_defined_recording_rules(prometheus: httpx.Client) -> None:
    rules = all_rules(prometheus)
    recorded = {r["name"] for r in rules if r["type"] == "recording"}
    read: set[str] = set()
    for rule in rules:
        exprs = [rule["query"]]
        for text in rule.get("annotations", {}).values():
            exprs += template_queries(text)
        for expr in exprs:
            assert_evaluates(prometheus, expr, rule["name"])
            names = metric_names(prometheus, expr)  # empty for the budget constant, vector(50)
            assert names <= SERIES | recorded, f"{rule['name']}: unknown metric {names - SERIES - recorded}"
            read |= names
    read |= {name for _, expr in queries(dashboard()) for name in metric_names(prometheus, substitute(expr))}
    assert recorded - read == set(), "recording rules nothing reads"


# ---- the Grafana dashboard --------------------------------------------------------------------


def test_the_dashboard_has_its_uid_and_variables() -> None:
    board = dashboard()
    assert board["uid"] == "moonq"
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query"
    assert model["datasource"] == DATASOURCE
    assert re.fullmatch(r"label_values\(\s*moonq_jobs_total\s*,\s*model\s*\)", model["query"])
    assert model["includeAll"] and model["allValue"] == ".*"


def test_dashboard_panels_have_unique_ids_the_datasource_variable_and_a_unit() -> None:
    board = dashboard()
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel["datasource"] == DATASOURCE, title
        assert panel["targets"], title
        assert all(t["datasource"] == DATASOURCE and t["expr"].strip() for t in panel["targets"]), title
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"


def test_dashboard_panels_fit_the_grid_without_overlapping() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in panels(dashboard()):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_dashboard_query_runs_on_a_real_prometheus(prometheus: httpx.Client) -> None:
    for title, expr in queries(dashboard()):
        assert_evaluates(prometheus, substitute(expr), title)


def test_the_dashboard_reads_every_family_and_nothing_else(prometheus: httpx.Client) -> None:
    recorded = {r["name"] for r in all_rules(prometheus) if r["type"] == "recording"}
    read: set[str] = set()
    for title, expr in queries(dashboard()):
        names = metric_names(prometheus, substitute(expr))
        assert names, (title, expr)
        assert names <= SERIES | recorded, f"{title}: unknown metric {names - SERIES - recorded}"
        read |= names
    families = {re.sub(r"_(bucket|count|sum)$", "", n) if n.startswith("moonq_") else n for n in read}
    assert COUNTERS | HISTOGRAMS | GAUGES | {"up"} <= families, "families no panel shows"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard_folder() -> None:
    datasource = DS_PROVISIONING.read_text()
    assert re.search(r"^\s*type:\s*prometheus\s*$", datasource, re.M)
    assert re.search(r"^\s*url:\s*http://prometheus:9090\s*$", datasource, re.M)
    default = next(v for v in dashboard()["templating"]["list"] if v["name"] == "datasource")["current"]["value"]
    assert re.search(rf"^\s*uid:\s*{re.escape(default)}\s*$", datasource, re.M), "dashboard default datasource"
    provider = DASHBOARD_PROVISIONING.read_text()
    assert re.search(r"^\s*type:\s*file\s*$", provider, re.M)
    assert re.search(r"^\s*path:\s*/\S+\s*$", provider, re.M)
