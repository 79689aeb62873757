"""The web console (``/console`` on the gateway) in a real browser: Playwright driving Debian's chromium.

One browser for the module, a fresh context (cookies) per test. Jobs are submitted through the
gateway's HTTP API and run by the suite's embedded worker against the simulator; the simulator's
``sim`` field paces them (``stall``: a pause mid-stream, so a page sees a job running) or fails them
(``quota``, a final error). Each page's screenshot is taken; with ``MOONQ_SCREENSHOTS=1`` (``make
screenshots``) they are saved under docs/console/, which docs/console.md shows. A second gateway on
the same Redis serves a tenants file: a tenant's session sees and acts on its own jobs only, an
operator's on every tenant's, and an edited cookie opens nothing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
import pytest
import redis
from playwright.sync_api import Browser, Page, expect, sync_playwright
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.registry import Collector

from gateway.app import GatewaySettings
from gateway.console.session import COOKIE, KEY_BYTES, Sessions
from gateway.console.web import CSP
from harness import WorkerProcess
from moonq.indexes import newest_first
from moonq.keys import GROUP_TAGS, GROUPS, Keys, group_of
from moonq.tenants import Principal, Tenants, hash_token
from producers import Client
from simulator import SimServer
from tests.helpers import node_env, serve_gateway, wait_until
from worker.exporter import RedisCollector
from worker.metrics import REGISTRY
from worker.settings import Settings

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The screenshots docs/console.md shows: rewritten only when asked (``make screenshots``), so that a
# test run leaves the checkout as it found it; otherwise taken all the same, into a scratch folder.
DOCS_SHOTS = Path(__file__).resolve().parent.parent / "docs" / "console"
SHOTS = DOCS_SHOTS if os.environ.get("MOONQ_SCREENSHOTS") == "1" else Path(tempfile.mkdtemp(prefix="moonq-shots-"))
TOKEN = "console-test-token-1"
OTHER = "console-test-token-2"
MODEL = "moonshot-v1-8k"
TIMEOUT_MS = 20_000


def ask(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        assert not os.environ.get("CI"), "CI must install chromium (.ci/run)"
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def gateway(settings: Settings, worker: Any) -> Iterator[str]:
    gw = GatewaySettings(redis_url=settings.redis_url, prefix=settings.prefix, gateway_tokens=f"{TOKEN},{OTHER}")
    with serve_gateway(gw) as url:
        yield url


@pytest.fixture
def api(gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as http:
        yield http


@pytest.fixture
def page(browser: Browser, gateway: str) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 760}, base_url=gateway)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


def sign_in(page: Page, token: str = TOKEN) -> None:
    page.goto("/console")
    expect(page).to_have_url(re.compile(r"/console/login$"))
    page.fill("#token", token)
    page.click("button[type=submit]")


def submit(api: httpx.Client, request: dict[str, Any]) -> str:
    resp = api.post("/v1/jobs", json=request)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def record(api: httpx.Client, job_id: str) -> dict[str, Any]:
    resp = api.get(f"/v1/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def streaming(settings: Settings, job_id: str) -> None:
    with Client(settings=settings) as client:
        wait_until(lambda: int(client.job(job_id).record().get("seq", 0)) > 0, 15, f"job {job_id} streaming")


def ended(api: httpx.Client, job_id: str) -> dict[str, Any]:
    wait_until(lambda: record(api, job_id)["status"] in ("succeeded", "failed", "cancelled"), 20, f"{job_id} ended")
    return record(api, job_id)


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


# --- signing in -------------------------------------------------------------------------------


def test_a_wrong_token_is_refused_and_the_right_one_opens_a_session_cookie(page: Page, gateway: str) -> None:
    sign_in(page, "not-a-token")
    expect(page.locator("#refused")).to_have_text("That token is not accepted.")
    assert "/console/login" in page.url and "not-a-token" not in page.content()
    page.goto("/console/jobs")  # still signed out
    expect(page).to_have_url(re.compile(r"/console/login$"))
    page.fill("#token", TOKEN)
    shot(page, "login")
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/console/jobs$"))
    (cookie,) = [c for c in page.context.cookies() if c["name"] == COOKIE]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    assert TOKEN not in cookie["value"] and TOKEN not in page.url and TOKEN not in page.content()
    # The gateway's API still wants its bearer token; the console's cookie is no substitute.
    assert httpx.get(f"{gateway}/v1/jobs/x", headers={"Cookie": f"{COOKIE}={cookie['value']}"}).status_code == 401
    page.click(".logout button")
    expect(page).to_have_url(re.compile(r"/console/login$"))
    page.goto("/console/jobs")
    expect(page).to_have_url(re.compile(r"/console/login$"))


def test_every_console_response_carries_a_strict_csp(gateway: str) -> None:
    for path in ("/console/login", "/console/static/job.js", "/console/jobs"):
        resp = httpx.get(f"{gateway}{path}")
        csp = resp.headers["content-security-policy"]
        assert csp == CSP and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert resp.headers["x-content-type-options"] == "nosniff" and resp.headers["x-frame-options"] == "DENY"


# --- the job page -----------------------------------------------------------------------------


def test_the_job_page_streams_the_answer_to_completion(page: Page, api: httpx.Client, settings: Settings) -> None:
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    sign_in(page)
    job_id = submit(api, ask("Stream to the console, please.", sim={"fault": "stall:2"}))
    streaming(settings, job_id)
    page.goto(f"/console/jobs/{job_id}")
    # Mid-stream: the first half of the answer is on the page while the job still runs.
    expect(page.locator("#status")).to_have_text("running")
    expect(page.locator("#answer .content")).not_to_be_empty()
    expect(page.locator("#timeline")).to_contain_text("attempt 1 streaming from seq 1")
    expect(page.locator("#job")).to_have_attribute("data-state", "ended")
    expect(page.locator("#status")).to_have_text("succeeded")
    result = record(api, job_id)["result"]
    assert page.locator("#answer .content").inner_text() == result["choices"][0]["message"]["content"]
    expect(page.locator("#timeline li").last).to_contain_text("completed (stop)")
    assert re.fullmatch(r"\d+ \(\d+ prompt, \d+ cached, \d+ completion, \d+ reasoning\)", page.inner_text("#tokens"))
    assert page.inner_text("#cost").startswith("$") and page.locator("#cancel").count() == 0
    expect(page.locator(".message.user")).to_contain_text("Stream to the console, please.")
    shot(page, "job")
    assert not errors, errors  # a CSP violation would be logged here


def test_cancel_a_running_job_from_its_page(page: Page, api: httpx.Client, settings: Settings) -> None:
    sign_in(page)
    job_id = submit(api, ask("A long answer to cancel.", sim={"fault": "stall:20"}))
    streaming(settings, job_id)
    page.goto(f"/console/jobs/{job_id}")
    expect(page.locator("#status")).to_have_text("running")
    page.click("#cancel")
    expect(page.locator("#status")).to_have_text("cancelled")
    expect(page.locator("#timeline li").last).to_contain_text("cancelled")
    assert ended(api, job_id)["status"] == "cancelled"
    expect(page.locator("#retry")).to_be_visible()  # a cancelled job can be run again


def test_an_answer_holding_html_is_shown_as_text(page: Page, api: httpx.Client, settings: Settings) -> None:
    attack = "<script>window.pwned = 1</script><img src=x onerror='window.pwned = 2'>"
    # The simulator answers a json_schema request with the schema's const: a chosen text, verbatim.
    schema = {"type": "object", "properties": {"html": {"const": attack}}, "required": ["html"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "page", "schema": schema}}
    sign_in(page)
    job_id = submit(api, ask("<b>not bold</b>", response_format=fmt, sim={"fault": "stall:1"}))
    streaming(settings, job_id)
    # Twice: assembled live by the page's script, then rendered by the server once the job has ended.
    for how in ("live", "rendered"):
        page.goto(f"/console/jobs/{job_id}")
        expect(page.locator("#job")).to_have_attribute("data-state", "ended")
        assert attack in page.locator("#answer .content").inner_text()
        assert page.locator("#answer script, #answer img").count() == 0
        assert page.evaluate("window.pwned") is None
        expect(page.locator(".message.user pre")).to_have_text("<b>not bold</b>")
        assert page.locator(".message.user b").count() == 0
        assert page.locator("#job").get_attribute("data-final") == ("" if how == "live" else "yes")
    assert attack in record(api, job_id)["result"]["choices"][0]["message"]["content"]


# --- actions need the form's CSRF token -------------------------------------------------------


def test_a_post_without_the_csrf_token_or_from_another_origin_is_refused(
    page: Page, api: httpx.Client, gateway: str, settings: Settings
) -> None:
    sign_in(page)
    job_id = submit(api, ask("Not to be cancelled by a forged form.", sim={"fault": "stall:3"}))
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    url = f"{gateway}/console/jobs/{job_id}/cancel"
    with httpx.Client(cookies=cookies) as browserish:
        assert browserish.post(url, content=b"", headers=form).status_code == 403
        assert browserish.post(url, content=b"csrf=guess", headers=form).status_code == 403
        page.goto(f"/console/jobs/{job_id}")
        csrf = page.locator("form input[name=csrf]").first.get_attribute("value")
        assert csrf
        evil = {**form, "Origin": "http://evil.example"}
        assert browserish.post(url, content=f"csrf={csrf}".encode(), headers=evil).status_code == 403
    assert record(api, job_id)["status"] in ("queued", "running")
    assert ended(api, job_id)["status"] == "succeeded"


# --- dead letters -----------------------------------------------------------------------------


def failing(api: httpx.Client, text: str) -> str:
    """A job that fails once (a quota 429 is final) and succeeds when retried (the script's next entry)."""
    job_id = submit(api, ask(text, sim={"script": ["quota", "ok"], "key": uuid.uuid4().hex}))
    assert ended(api, job_id)["status"] == "failed"
    return job_id


def test_retry_a_dead_letter_and_then_many(page: Page, api: httpx.Client) -> None:
    first = failing(api, "Fail once, then succeed.")
    sign_in(page)
    page.goto("/console/failed")
    row = page.locator("#failed tr", has_text=first)
    expect(row).to_contain_text("exceeded_current_quota_error")
    shot(page, "failed")
    row.locator("button.retry-one").click()
    expect(page).to_have_url(re.compile(r"/console/jobs/[0-9a-f-]{36}$"))
    new_id = page.url.rsplit("/", 1)[1]
    assert new_id != first
    expect(page.locator("#status")).to_have_text("succeeded")
    expect(page.locator("dl.facts")).to_contain_text(first)  # retry of
    assert record(api, new_id)["status"] == "succeeded"

    many = [failing(api, f"Fail once ({n}).") for n in range(2)]
    page.goto("/console/failed")
    expect(page.locator("#failed tr", has_text=first)).to_have_count(0)  # retried: no longer a dead letter
    for job_id in many:
        page.locator(f"input.pick[value='{job_id}']").check()
    page.click("#retry-selected")
    expect(page.locator("#retried")).to_have_text("2 job(s) submitted again.")
    for job_id in many:
        expect(page.locator("#failed tr", has_text=job_id)).to_have_count(0)


# --- jobs list and fleet ----------------------------------------------------------------------


def test_the_jobs_list_filters_and_finds_a_job_by_id(page: Page, api: httpx.Client) -> None:
    done = submit(api, ask("One for the list."))
    ended(api, done)
    sign_in(page)
    expect(page.locator("#jobs")).to_contain_text(done)
    row = page.locator("#jobs tr", has_text=done)
    expect(row).to_contain_text("succeeded")
    expect(row).to_contain_text("default")  # the tenant of every job without a tenants file
    expect(row.locator("td.num").nth(1)).to_contain_text("$")
    shot(page, "jobs")
    page.select_option("select[name=status]", "failed")
    page.click(".filters button")
    expect(page.locator("#jobs")).not_to_contain_text(done)
    assert all(
        s == "failed" for s in page.locator("#jobs tbody tr").evaluate_all("rows => rows.map(r => r.dataset.status)")
    )
    page.fill("input[name=q]", done)
    page.click(".filters button")
    expect(page).to_have_url(re.compile(f"/console/jobs/{done}$"))


class _Node(Collector):
    """A node's /metrics as the embedded worker's registry and a node's Redis gauges give them."""

    def __init__(self, redis_gauges: RedisCollector) -> None:
        self.redis_gauges = redis_gauges

    def collect(self) -> Iterator[Any]:
        yield from REGISTRY.collect()
        yield from self.redis_gauges.collect()


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def serve_node(settings: Settings, r: redis.Redis, **node: Any) -> Iterator[str]:
    """The embedded worker's metrics served on a free port and announced in P:nodes, as a node announces itself.

    The Redis gauges are read as a node with fleet limits reports them (the embedded worker runs
    without limits, so its buckets read full): the page's limiter section has something to show.
    ``node`` are more of that node's settings (its tenants file: the tenants' budget gauges).
    """
    limited = settings.model_copy(update={"rpm": 600, "tpm": 1_000_000, "max_inflight": 16, **node})
    gauges = RedisCollector(limited)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Node(gauges))
    server: WSGIServer = make_server("127.0.0.1", 0, make_wsgi_app(registry), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    r.zadd(settings.keys.nodes, {url: time.time() + 60})
    try:
        yield url
    finally:
        r.zrem(settings.keys.nodes, url)
        server.shutdown()
        server.server_close()
        gauges.redis.close()


@pytest.fixture
def node(settings: Settings, r: redis.Redis) -> Iterator[str]:
    with serve_node(settings, r) as url:
        yield url


def test_the_fleet_page_shows_the_nodes_and_refreshes(page: Page, api: httpx.Client, node: str) -> None:
    sign_in(page)
    page.goto("/console/fleet")
    expect(page.locator("[data-cell=nodes]")).to_have_text(re.compile(r"[1-9]\d* up / \d+ known"))
    expect(page.locator("#nodes")).to_contain_text(f"{node} · up")
    for n in range(3):
        ended(api, submit(api, ask(f"Fleet traffic {n}.")))
    expect(page.locator("#fleet")).to_have_attribute("data-refreshed", re.compile(r"[1-9]"))
    expect(page.locator("[data-cell=throughput]")).to_have_text(re.compile(r"\d+\.\d\d jobs/s"))
    expect(page.locator("#limits")).to_contain_text("inflight")
    assert page.inner_text("[data-cell=cost_total]").startswith("$")
    shot(page, "fleet")


# --- the recent-jobs index at scale -----------------------------------------------------------


# Fills the recent-jobs index and the records of ``ARGV[2]`` queued jobs (ids ``00000001-big``, ...) in
# one call. ARGV[1] the record key's prefix (``Keys.job("")``), ARGV[3] the index key, ARGV[4] now, ARGV[5] model.
FILL_LUA = """
local n, now = tonumber(ARGV[2]), tonumber(ARGV[4])
for i = 1, n do
  local id, at = string.format('%08d-big%x', i, i % 16), now - n + i
  local tag = '{' .. ARGV[6 + i % 16] .. '}'
  local job = ARGV[1] .. ':job:' .. tag .. ':' .. id
  redis.call('HSET', job, 'status', 'queued', 'model', ARGV[5], 'enqueued_at', string.format('%.3f', at),
             'priority', '5', 'seq', '0')
  redis.call('EXPIRE', job, 600)
  redis.call('ZADD', ARGV[1] .. ':recent:' .. tag, at, id)
  redis.call('EXPIRE', ARGV[1] .. ':recent:' .. tag, 600)
end
return n
"""


def test_the_jobs_list_stays_fast_with_100000_jobs(r: redis.Redis, settings: Settings) -> None:
    keys, count = Keys(f"big{uuid.uuid4().hex[:6]}"), 100_000
    # Ids ``<n>-big<hex>``: the last digit spreads them over the 16 groups (moonq/keys.py).
    r.eval(FILL_LUA, 0, keys.prefix, count, "", time.time(), MODEL, *GROUP_TAGS)
    newest, oldest = f"{count:08d}-big{count % 16:x}", f"{1:08d}-big1"
    gw = GatewaySettings(redis_url=settings.redis_url, prefix=keys.prefix, gateway_tokens=TOKEN)
    try:
        with serve_gateway(gw) as url, httpx.Client(base_url=url, timeout=10) as http:
            csrf = re.search(r'name="csrf" value="([^"]+)"', http.get("/console/login").text)
            assert csrf
            assert http.post("/console/login", data={"csrf": csrf[1], "token": TOKEN}).status_code == 303
            pages = {}
            # The newest page, the last, a filter that matches, one that matches nothing in its window, a search.
            for query in ("", "?offset=99950", "?status=queued&offset=50000", "?status=failed", "?q=0009999"):
                started = time.monotonic()
                resp = http.get(f"/console/jobs{query}")
                took_s = time.monotonic() - started
                assert resp.status_code == 200 and took_s < 1.0, (query, took_s)
                pages[query] = resp.text
            assert newest in pages[""] and "100000 job(s)" in pages[""] and oldest in pages["?offset=99950"]
            assert len(re.findall("-big[0-9a-f]</a>", pages["?status=queued&offset=50000"])) == 50
            assert "No jobs match in this window" in pages["?status=failed"]
            assert len(re.findall("-big[0-9a-f]</a>", pages["?q=0009999"])) == 10  # 00099990 .. 00099999
    finally:
        r.delete(keys.console_session_key, *(keys.recent_in(g) for g in GROUPS))
        for start in range(1, count + 1, 10_000):
            r.delete(*(keys.job(f"{i:08d}-big{i % 16:x}") for i in range(start, min(start + 10_000, count + 1))))


def test_a_submit_adds_the_job_to_the_recent_index_which_forgets_by_age(r: redis.Redis, settings: Settings) -> None:
    short = settings.model_copy(update={"prefix": f"rec{uuid.uuid4().hex[:6]}", "result_ttl_s": 60})
    indexes = [short.keys.recent_in(g) for g in GROUPS]
    for index in indexes:
        r.zadd(index, {"old-job": time.time() - 61})
    with Client(settings=short) as client:
        job = client.submit(ask("Index me."))  # nobody consumes this prefix's queue: it stays queued
        index = short.keys.recent_in(group_of(job.id))
        assert r.zrange(index, 0, -1) == [job.id.encode()]  # the write trimmed its group's by age
        assert 0 < r.ttl(index) <= 60
        jobs = client.submit_many([ask("Me too."), ask("And me.")])
        listed = {job_id for job_id, _ in newest_first(r, indexes, 20)}
        assert listed - {"old-job"} == {job.id, *(j.id for j in jobs)}
        assert job.cancel() and all(j.cancel() for j in jobs)


# --- the session cookie, without a browser ----------------------------------------------------


def test_sessions_refuse_forged_expired_revoked_and_moved_cookies(tmp_path: Path) -> None:
    key = secrets.token_bytes(KEY_BYTES)
    both = Tenants.default([TOKEN, OTHER])
    sessions = Sessions(key, both)
    opened = sessions.open(f" {TOKEN} ", now=1000.0)
    assert opened and opened.principal == Principal("default", operator=True)
    assert sessions.open("nope") is None and sessions.open("") is None and sessions.open("  ") is None
    cookie = sessions.encode(opened)
    assert sessions.decode(cookie, now=1001.0) == opened
    assert sessions.decode(cookie, now=1000.0 + sessions.max_age_s) is None  # expired
    payload, signature = cookie.split(".")
    assert sessions.decode(f"{payload}x.{signature}", now=1001.0) is None  # tampered
    assert sessions.decode("garbage", now=1001.0) is None and sessions.decode(None) is None
    anonymous = sessions.issue(now=1000.0)
    assert sessions.decode(sessions.encode(anonymous), now=1001.0) == anonymous and not anonymous.signed_in
    assert Sessions(secrets.token_bytes(KEY_BYTES), both).decode(cookie, now=1001.0) is None  # another key
    assert Sessions(key, Tenants.default([TOKEN])).decode(cookie, now=1001.0) == opened  # its token stays
    assert Sessions(key, Tenants.default([OTHER])).decode(cookie, now=1001.0) is None  # its token was removed
    # The same token, now a tenant's in a tenants file: the operator's session it opened ends.
    moved = tmp_path / "tenants.json"
    moved.write_text(json.dumps({"tenants": {"search": {"tokens_sha256": [hash_token(TOKEN)]}}}))
    assert Sessions(key, Tenants.load(moved)).decode(cookie, now=1001.0) is None


# --- tenants: a gateway with a tenants file ---------------------------------------------------

TENANT_TOKENS = {"search": "console-search-token", "reports": "console-reports-token", "ops": "console-ops-token"}
SEARCH_DAILY_TOKENS = 5_000_000


@pytest.fixture(scope="module")
def tenants_settings(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> GatewaySettings:
    """A tenants file's gateway on the suite's Redis and prefix (the embedded worker runs its jobs)."""
    path = tmp_path_factory.mktemp("console-tenants") / "tenants.json"
    entry: dict[str, dict[str, Any]] = {
        name: {"tokens_sha256": [hash_token(TENANT_TOKENS[name])]} for name in ("search", "reports")
    }
    entry["search"]["daily_tokens"] = SEARCH_DAILY_TOKENS  # far above what the tests use: never refuses a job
    path.write_text(json.dumps({"operators": {"tokens_sha256": [hash_token(TENANT_TOKENS["ops"])]}, "tenants": entry}))
    return GatewaySettings(redis_url=settings.redis_url, prefix=settings.prefix, tenants_file=str(path))


@pytest.fixture(scope="module")
def tenants_worker(settings: Settings, tenants_settings: GatewaySettings, sim: SimServer) -> Iterator[WorkerProcess]:
    """A node of the tenants file's deployment (``celery -A worker worker``): it consumes the tenants' queues."""
    with WorkerProcess(node_env(settings, sim.base_url, MOONQ_TENANTS_FILE=tenants_settings.tenants_file)) as node:
        yield node


@pytest.fixture(scope="module")
def tenants_gateway(tenants_settings: GatewaySettings, tenants_worker: WorkerProcess) -> Iterator[str]:
    with serve_gateway(tenants_settings) as url:
        yield url


@pytest.fixture
def tenants_node(settings: Settings, r: redis.Redis, tenants_settings: GatewaySettings) -> Iterator[str]:
    """A node of the tenants file's deployment: it reports each configured tenant's spend and budgets."""
    with serve_node(settings, r, tenants_file=tenants_settings.tenants_file) as url:
        yield url


@pytest.fixture
def as_tenant(browser: Browser, tenants_gateway: str) -> Iterator[Any]:
    """Signs a fresh browser context in with a tenants file's token; yields its page."""
    contexts = []

    def sign_in_as(who: str) -> Page:
        context = browser.new_context(viewport={"width": 1200, "height": 760}, base_url=tenants_gateway)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        sign_in(page, TENANT_TOKENS[who])
        expect(page).to_have_url(re.compile(r"/console/jobs$"))
        return page

    yield sign_in_as
    for context in contexts:
        context.close()


def tenant_api(gateway: str, who: str) -> httpx.Client:
    return httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {TENANT_TOKENS[who]}"}, timeout=10)


def cookie_of(page: Page) -> str:
    (value,) = [c["value"] for c in page.context.cookies() if c["name"] == COOKIE]
    return value


def refusal(page: Page, path: str, job_id: str) -> tuple[int, str]:
    """The status and message of the console's answer to ``path``, with ``job_id`` blanked out."""
    resp = page.goto(path)
    assert resp is not None
    return resp.status, page.inner_text("#error").replace(job_id, "ID")


def test_a_tenants_session_sees_only_its_jobs_and_an_operators_every_tenants(
    as_tenant: Any, tenants_gateway: str
) -> None:
    with tenant_api(tenants_gateway, "search") as search, tenant_api(tenants_gateway, "reports") as reports:
        ours = submit(search, ask("A search job."))
        theirs = failing(reports, "A reports job that fails.")  # a dead letter, too
        ended(search, ours)
    page = as_tenant("search")
    expect(page.locator("#who")).to_have_text("tenant search")
    expect(page.locator("#jobs")).to_contain_text(ours)
    expect(page.locator("#jobs")).not_to_contain_text(theirs)
    assert page.locator("select[name=tenant]").count() == 0
    # Another tenant's job answers exactly as an id nobody ever submitted: the page, its events, the search box.
    unknown = str(uuid.uuid4())
    for path in ("/console/jobs/{}", "/console/jobs/{}/events"):
        answer = refusal(page, path.format(theirs), theirs)
        assert answer[0] == 404 and answer == refusal(page, path.format(unknown), unknown)
    for job_id in (theirs, unknown):
        page.goto(f"/console/jobs?q={job_id}")
        expect(page).to_have_url(re.compile(rf"/console/jobs\?q={job_id}$"))
        expect(page.locator("#jobs tbody")).to_have_text("No jobs match in this window.")
    page.goto(f"/console/jobs?q={ours}")
    expect(page).to_have_url(re.compile(f"/console/jobs/{ours}$"))
    page.goto("/console/failed")
    expect(page.locator("#failed")).not_to_contain_text(theirs)

    operator = as_tenant("ops")
    expect(operator.locator("#who")).to_have_text("operator")
    expect(operator.locator("#jobs tr", has_text=ours)).to_contain_text("search")
    expect(operator.locator("#jobs tr", has_text=theirs)).to_contain_text("reports")
    operator.select_option("select[name=tenant]", "reports")
    operator.click(".filters button")
    expect(operator.locator("#jobs")).to_contain_text(theirs)
    expect(operator.locator("#jobs")).not_to_contain_text(ours)
    operator.goto(f"/console/jobs/{theirs}")
    expect(operator.locator("#status")).to_have_text("failed")
    operator.goto("/console/failed")
    expect(operator.locator("#failed tr", has_text=theirs)).to_contain_text("reports")


def test_a_tenant_cannot_act_on_another_tenants_job(as_tenant: Any, tenants_gateway: str) -> None:
    with tenant_api(tenants_gateway, "reports") as reports:
        running = submit(reports, ask("Not to be cancelled by search.", sim={"fault": "stall:3"}))
        dead = failing(reports, "Not to be retried by search.")
        page = as_tenant("search")
        csrf = page.locator("form.logout input[name=csrf]").get_attribute("value")
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        with httpx.Client(base_url=tenants_gateway, cookies={COOKIE: cookie_of(page)}) as browserish:
            for path, body in (
                (f"/console/jobs/{running}/cancel", f"csrf={csrf}"),
                (f"/console/jobs/{dead}/retry", f"csrf={csrf}"),
                ("/console/failed/retry", f"csrf={csrf}&ids={dead}"),
                ("/console/failed/retry", f"csrf={csrf}&one={dead}"),
            ):
                resp = browserish.post(path, content=body.encode(), headers=form)
                assert resp.status_code == 404, (path, resp.text)
        assert ended(reports, running)["status"] == "succeeded"  # never cancelled
        assert record(reports, dead)["status"] == "failed"
    operator = as_tenant("ops")
    operator.goto("/console/failed")
    expect(operator.locator("#failed tr", has_text=dead)).to_have_count(1)  # still a dead letter: not retried


def test_a_tenant_sees_the_fleets_health_but_not_its_spend_or_nodes(
    as_tenant: Any, tenants_gateway: str, tenants_node: str
) -> None:
    with tenant_api(tenants_gateway, "search") as search:  # a job ended: the fleet has a cost to show
        ended(search, submit(search, ask("Fleet traffic for search.")))
    page = as_tenant("search")
    page.goto("/console/fleet")
    expect(page.locator("[data-cell=nodes]")).to_have_text(re.compile(r"[1-9]\d* up / \d+ known"))
    expect(page.locator("#fleet")).to_have_attribute("data-refreshed", re.compile(r"[1-9]"))  # the script runs
    # Neither the fleet's spend nor any tenant's usage (its own included: the rows are the operators').
    assert page.locator("[data-cell=cost_per_hour], [data-cell=tokens_per_hour], #nodes, #tenants").count() == 0
    snapshot = page.request.get("/console/fleet.json").json()
    assert "cost_total" not in snapshot["cells"] and "queue" in snapshot["cells"] and snapshot["nodes"] == []
    assert snapshot["tenants"] == []
    assert tenants_node not in page.content() and "reports" not in page.inner_text("#fleet")
    operator = as_tenant("ops")
    operator.goto("/console/fleet")
    expect(operator.locator("#nodes")).to_contain_text(tenants_node)
    assert operator.inner_text("[data-cell=cost_total]").startswith("$")
    # A row per tenant of the file, as the page first drew it and again as its script redraws it (with rates).
    rows = operator.locator("#tenants tbody tr")
    searched, reported = rows.filter(has_text="search"), rows.filter(has_text="reports")
    expect(operator.locator("#tenants")).to_be_visible()
    expect(searched.locator("td").last).to_have_text(re.compile(r"^left today [\d.]+[kM]? of 5\.0M tokens$"))
    expect(reported.locator("td").last).to_have_text(re.compile(r"^no budget"))
    expect(operator.locator("#fleet")).to_have_attribute("data-refreshed", re.compile(r"[1-9]"))
    for row in (searched, reported):
        expect(row.locator("td").nth(1)).to_contain_text(re.compile(r"^\d+\.\d\d jobs/s"))
        expect(row.locator("td").nth(2)).to_have_text(re.compile(r"/min$"))
        expect(row.locator("td").nth(3)).to_have_text(re.compile(r"^\$\d+\.\d{4}/h$"))


def _edited(cookie: str, **changes: Any) -> str:
    """The cookie with fields of its payload changed and its signature kept."""
    payload, signature = cookie.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    edited = base64.urlsafe_b64encode(json.dumps({**data, **changes}).encode()).rstrip(b"=").decode()
    return f"{edited}.{signature}"


def test_an_edited_or_foreign_cookie_is_refused_and_the_key_outlives_the_gateway(
    as_tenant: Any, page: Page, tenants_settings: GatewaySettings, tenants_gateway: str, r: redis.Redis
) -> None:
    with tenant_api(tenants_gateway, "reports") as reports:
        theirs = submit(reports, ask("Reports only."))
    search = as_tenant("search")
    cookie, host = cookie_of(search), urlsplit(tenants_gateway).hostname
    sign_in(page)  # the token-mode gateway on the same Redis: the same key, but not a token of this file
    forged = [
        _edited(cookie, tenant="reports"),
        _edited(cookie, tenant=None, operator=True),
        f"{cookie.split('.')[0]}.{base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip('=')}",
        cookie_of(page),
    ]
    for value in forged:
        search.context.add_cookies([{"name": COOKIE, "value": value, "domain": host, "path": "/console"}])
        search.goto(f"/console/jobs/{theirs}")
        expect(search).to_have_url(re.compile(r"/console/login$"))
        assert theirs not in search.content()
    # One key for the deployment, made once, kept in Redis (no TTL): another gateway process takes the session.
    key = tenants_settings.keys.console_session_key
    assert len(r.get(key) or b"") == KEY_BYTES and r.ttl(key) == -1
    with serve_gateway(tenants_settings) as again, httpx.Client(base_url=again, cookies={COOKIE: cookie}) as http:
        resp = http.get("/console/jobs")
        assert resp.status_code == 200 and "tenant search" in resp.text
    assert len(r.get(key) or b"") == KEY_BYTES
