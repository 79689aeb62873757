"""Webhooks (docs/webhooks.md): signed, delivered at least once, never to where a node must not go.

Real parts throughout: ``celery -A worker worker`` nodes, the simulator as the upstream, and a
real HTTP receiver (tests/webhook_receiver.py) whose every request is checked with the Standard
Webhooks library, as a receiver would. Delays are shrunk (1 s attempts, 0.2 s first backoff, a
pending delivery taken over after 2 s); the logic is the production logic.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from standardwebhooks import Webhook, WebhookVerificationError

from console.cli import main as moonq
from console.fleetview import Scrape, deliveries_row, parse_exposition
from gateway.app import GatewaySettings
from harness import RedisServer, TcpProxy, WorkerProcess, free_port
from moonq.deliveries import GROUP, backlog, failed_deliveries
from moonq.errors import InvalidRequest
from moonq.eventlog import read_log
from moonq.fleet import total
from moonq.record import JobField
from moonq.settings import ClientSettings
from moonq.webhooks import delivery_id, parse_delivery_id, parse_secrets, signed_headers
from producers import Client
from simulator import SimServer
from tests.helpers import active_count, make_settings, node_env, serve_gateway, unbounded_keys, wait_until
from tests.webhook_receiver import Receiver, serve_receiver
from worker.exporter import RedisCollector
from worker.webhook_http import AllowList, WebhookSender

HELLO = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "Hello, webhook."}]}


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


OLD, NEW = new_secret(), new_secret()
# Fast delivery timings for the nodes under test.
FAST_DELIVERY = {
    "MOONQ_WEBHOOK_SECRET": f"{NEW},{OLD}",  # a rotation in progress: newest first
    "MOONQ_WEBHOOK_ALLOW": "localhost",  # the receiver, by name: private address and plain http opened
    "MOONQ_WEBHOOK_TIMEOUT_S": "1",
    "MOONQ_WEBHOOK_CLAIM_IDLE_S": "2",
    "MOONQ_WEBHOOK_BACKOFF_BASE_S": "0.2",
    "MOONQ_WEBHOOK_BACKOFF_MAX_S": "1",
    "MOONQ_WEBHOOK_RETRY_FOR_S": "60",
}


def verified(got: Any, secret: str = OLD) -> dict[str, Any]:
    """The body of a received request, verified as a receiver verifies it (raises if it does not verify)."""
    return Webhook(secret).verify(got.body, got.headers)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def stack(redis_url: str, sim: SimServer) -> Iterator[ClientSettings]:
    """One real node on a prefix of its own, with the fast delivery timings."""
    settings = make_settings(redis_url, prefix=f"wh{uuid.uuid4().hex[:6]}")
    with WorkerProcess(node_env(settings, sim.base_url, **FAST_DELIVERY)):
        yield ClientSettings(redis_url=redis_url, prefix=settings.prefix)


@pytest.fixture
def client(stack: ClientSettings) -> Iterator[Client]:
    with Client(settings=stack) as c:
        yield c


def dead(client: Client, did: str, timeout_s: float = 15.0) -> dict[str, Any]:
    def found() -> bool:
        return any(row["id"] == did for row in failed_deliveries(client.redis, client.keys, 100))

    wait_until(found, timeout_s, f"{did} among the dead deliveries")
    return next(row for row in failed_deliveries(client.redis, client.keys, 100) if row["id"] == did)


# ---- signing, pure ---------------------------------------------------------------------------


def test_each_secret_of_a_rotation_verifies_the_signature_on_its_own() -> None:
    body = json.dumps({"type": "job.succeeded", "data": {"id": "j"}}).encode()
    headers = signed_headers(parse_secrets(f"{NEW},{OLD}"), "webhook:j", int(time.time()), body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert all(sig.startswith("v1,") for sig in headers["webhook-signature"].split(" "))
    for secret in (OLD, NEW):
        assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded", "data": {"id": "j"}}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(OLD).verify(body.replace(b"j", b"k"), headers)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("secret", "does not start with"),
        ("whsec_!!!", "not base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "is 5 bytes"),
    ],
)
def test_a_malformed_secret_is_refused_without_showing_it(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        parse_secrets(f"{OLD},{text}")
    assert OLD not in str(caught.value) and "secret 2" in str(caught.value)


# ---- the producer's side ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"webhook": "ftp://example.com/hook"}, "webhook"),
        ({"webhook": "https://"}, "webhook"),
        ({"webhook": "https://user:pw@example.com/hook"}, "webhook"),
        ({"webhook": "https://example.com/a b"}, "webhook"),
        ({"on_done": "not a task"}, "on_done"),
        ({"on_done_queue": "answers"}, "on_done_queue"),
        ({"webhook_events": ["started"]}, "webhook_events"),
        ({"webhook": "https://example.com/hook", "webhook_events": ["started", "finished"]}, "webhook_events"),
        ({"webhook": "https://example.com/hook", "webhook_events": [3]}, "webhook_events"),
    ],
)
def test_bad_options_are_refused_before_anything_is_enqueued(
    fresh_prefix: Any, options: dict[str, Any], field: str
) -> None:
    with Client(settings=fresh_prefix) as c:
        with pytest.raises(InvalidRequest) as caught:
            c.submit(HELLO, **options)
        assert caught.value.errors[0][0] == field
        assert not active_count(c.redis, c.keys)


def test_the_options_go_in_the_record_never_in_the_task_message(fresh_prefix: Any) -> None:
    with Client(settings=fresh_prefix) as c:
        job = c.submit(HELLO, webhook="https://example.com/hook", on_done="app.tasks.done", on_done_queue="answers")
        rec = job.record()
        assert rec[JobField.WEBHOOK] == "https://example.com/hook"
        assert (rec[JobField.ON_DONE], rec[JobField.ON_DONE_QUEUE]) == ("app.tasks.done", "answers")
        envelope = json.loads(rec[JobField.ENVELOPE])
        assert set(envelope) == {"v", "job_id", "request", "enqueued_at", "priority"}
        assert "example.com" not in rec[JobField.ENVELOPE] and "app.tasks" not in rec[JobField.ENVELOPE]
        many = c.submit_many([HELLO, HELLO], webhook="https://example.com/many")
        assert {j.record()[JobField.WEBHOOK] for j in many} == {"https://example.com/many"}


def test_delivery_ids_name_the_job_and_the_event() -> None:
    job = str(uuid.uuid4())
    ids = [delivery_id("webhook", job), delivery_id("webhook", job, "started"), delivery_id("webhook", job, "retry", 7)]
    assert ids == [f"webhook:{job}", f"webhook:{job}:started", f"webhook:{job}:retry:7"]
    assert {parse_delivery_id(i) for i in ids} == {("webhook", job)}
    for bad in (f"webhook:{job}:finished", f"webhook:{job}:retry:x", f"mail:{job}", "webhook:"):
        with pytest.raises(ValueError):
            parse_delivery_id(bad)


# ---- delivery through a real node --------------------------------------------------------------


def test_a_job_end_is_posted_once_signed_for_both_secrets(client: Client, receiver: Receiver) -> None:
    url = receiver.script("once")
    job = client.submit(HELLO, webhook=url)
    answer = job.result(timeout=20)
    [got] = receiver.wait_for("once", 1)
    assert got.headers["webhook-id"] == delivery_id("webhook", job.id)
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    assert verified(got, OLD) == verified(got, NEW)
    body = verified(got)
    assert body["type"] == "job.succeeded" and body["timestamp"].endswith("Z")
    data = body["data"]
    assert (data["id"], data["status"], data["tenant"], data["error"]) == (job.id, "succeeded", "default", None)
    assert data["result"]["choices"][0]["message"]["content"] == answer.choices[0].message.content
    assert data["usage"]["total_tokens"] > 0 and data["cost_usd"] > 0
    assert data["enqueued_at"] <= data["started_at"] <= data["finished_at"]
    wait_until(lambda: backlog(client.redis, client.keys)["queued"] == 0, 5, "the entry settled")
    time.sleep(0.5)
    assert len(receiver.received("once")) == 1


def test_a_failed_and_a_cancelled_job_are_delivered_too(client: Client, receiver: Receiver) -> None:
    failing = client.submit({**HELLO, "sim": {"fault": "quota"}}, webhook=receiver.script("failed"))
    slow = client.submit({**HELLO, "sim": {"fault": "stall:5"}}, webhook=receiver.script("cancelled"))
    wait_until(lambda: slow.status() == "running", 10, "the slow job running")
    slow.cancel()
    failed = verified(receiver.wait_for("failed", 1)[0])
    assert (failed["type"], failed["data"]["status"]) == ("job.failed", "failed")
    assert failed["data"]["error"]["status"] == 429 and failed["data"]["result"] is None
    assert failing.status() == "failed"
    cancelled = verified(receiver.wait_for("cancelled", 1)[0])
    assert (cancelled["type"], cancelled["data"]["error"]) == ("job.cancelled", None)


def test_a_subscribed_webhook_gets_the_start_and_each_retry_too(client: Client, receiver: Receiver) -> None:
    sim = {"script": ["overload", "ok"], "key": uuid.uuid4().hex}
    job = client.submit({**HELLO, "sim": sim}, webhook=receiver.script("progress"), webhook_events=["retry", "started"])
    assert job.record()[JobField.WEBHOOK_EVENTS] == "started,retry"
    job.result(timeout=30)
    got = {
        verified(r)["type"]: (r.headers["webhook-id"], verified(r)["data"]) for r in receiver.wait_for("progress", 3)
    }
    [retry_seq] = [e.seq for e in read_log(client.redis, client.keys, job.id) if e.type == "retry"]
    assert {t: i for t, (i, _) in got.items()} == {
        "job.started": delivery_id("webhook", job.id, "started"),
        "job.retry": delivery_id("webhook", job.id, "retry", retry_seq),
        "job.succeeded": delivery_id("webhook", job.id),
    }
    started, retry = got["job.started"][1], got["job.retry"][1]
    assert (started["id"], started["status"], started["attempt"]) == (job.id, "running", 1)
    assert started["started_at"] == float(job.record()[JobField.STARTED_AT])
    assert (retry["status"], retry["attempt"], retry["reason"]) == ("retrying", 2, "engine_overloaded_error")
    time.sleep(0.5)
    assert len(receiver.received("progress")) == 3  # each once; an unsubscribed job gets only its end (above)


def test_a_progress_delivery_is_retried_under_its_own_id(client: Client, receiver: Receiver) -> None:
    job = client.submit(HELLO, webhook=receiver.script("progress-flaky", 500), webhook_events=["started"])
    tries = receiver.wait_for("progress-flaky", 3)
    first = tries[0].headers["webhook-id"]
    again = [t for t in tries[1:] if t.headers["webhook-id"] == first]
    assert again and again[0].body == tries[0].body  # the same id and body on the retry
    assert {t.headers["webhook-id"] for t in tries} == {
        delivery_id("webhook", job.id, "started"),
        delivery_id("webhook", job.id),
    }
    wait_until(lambda: backlog(client.redis, client.keys) == {"queued": 0, "retrying": 0, "dead": 0}, 5, "settled")


def test_500s_are_retried_with_the_same_id_and_body(client: Client, receiver: Receiver) -> None:
    job = client.submit(HELLO, webhook=receiver.script("flaky", 500, 503))
    tries = receiver.wait_for("flaky", 3)
    assert {t.headers["webhook-id"] for t in tries} == {delivery_id("webhook", job.id)}
    assert len({t.body for t in tries}) == 1
    assert all(verified(t)["data"]["id"] == job.id for t in tries)
    assert tries[1].at - tries[0].at >= 0.15  # backed off
    wait_until(lambda: backlog(client.redis, client.keys) == {"queued": 0, "retrying": 0, "dead": 0}, 5, "settled")


def test_a_dropped_connection_is_retried(client: Client, receiver: Receiver) -> None:
    target = int(receiver.url.rsplit(":", 1)[1])
    with TcpProxy(target) as proxy:
        receiver.script("dropped", "hold")
        url = f"http://localhost:{proxy.port}/dropped"
        job = client.submit(HELLO, webhook=url)
        receiver.wait_for("dropped", 1)
        assert proxy.cut() >= 1  # the node's connection, reset mid-request
        tries = receiver.wait_for("dropped", 2)
    assert tries[0].headers["webhook-id"] == tries[1].headers["webhook-id"] == delivery_id("webhook", job.id)
    verified(tries[1])


def test_a_4xx_is_not_retried_and_is_redelivered_by_hand(
    client: Client, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    job = client.submit(HELLO, webhook=receiver.script("refused", 400))
    did = delivery_id("webhook", job.id)
    row = dead(client, did)
    assert (row["attempts"], row["kind"], row["job_id"]) == (1, "webhook", job.id)
    assert row["error"].startswith("400")
    time.sleep(0.5)
    assert len(receiver.received("refused")) == 1
    monkeypatch.setenv("MOONQ_PREFIX", client.settings.prefix)
    redis_url = ["--redis-url", client.settings.redis_url]
    assert moonq([*redis_url, "webhooks", "failed", "--json"]) == 0
    assert did in [r["id"] for r in json.loads(capsys.readouterr().out)]
    assert moonq([*redis_url, "webhooks", "redeliver", did]) == 0
    [_, again] = receiver.wait_for("refused", 2)
    assert again.headers["webhook-id"] == did and verified(again)["data"]["id"] == job.id
    wait_until(lambda: not client.redis.exists(client.keys.delivery(did, job.id)), 5, "the delivery's state gone")
    assert moonq([*redis_url, "webhooks", "redeliver", did]) == 3  # delivered: no dead letter any more
    assert moonq([*redis_url, "webhooks", "redeliver", "not-an-id"]) == 2


def test_a_redirect_is_not_followed(client: Client, receiver: Receiver) -> None:
    job = client.submit(HELLO, webhook=receiver.script("redirecting", "redirect"))
    row = dead(client, delivery_id("webhook", job.id))
    assert "redirect" in row["error"] and "not followed" in row["error"]
    assert receiver.received("redirecting-moved") == []


def test_a_private_address_is_refused_without_the_allow_list(client: Client, receiver: Receiver) -> None:
    # The node allows "localhost" by name; the same receiver by its address is a private address.
    url = receiver.script("private").replace("localhost", "127.0.0.1")
    job = client.submit(HELLO, webhook=url)
    row = dead(client, delivery_id("webhook", job.id))
    assert "not a public address" in row["error"]
    assert receiver.received("private") == []


def test_the_sender_vets_every_address_it_connects_to(receiver: Receiver) -> None:
    asyncio.run(sender_vets_every_address(receiver))


async def sender_vets_every_address(receiver: Receiver) -> None:
    body, port = b"{}", receiver.url.rsplit(":", 1)[1]
    receiver.script("vetted")
    closed = WebhookSender(AllowList(), timeout_s=2, max_connections=4)
    opened = WebhookSender(AllowList.parse("127.0.0.0/8"), timeout_s=2, max_connections=4)
    by_name = WebhookSender(AllowList.parse(".localdomain, localhost"), timeout_s=2, max_connections=4)
    try:
        # A name resolving to loopback: refused by the resolver, before any connection.
        https_name = await closed.post(f"https://localhost:{port}/vetted", body, {})
        assert (https_name.verdict, https_name.label) == ("give_up", "blocked")
        assert "resolves only to" in https_name.note
        for url in (f"http://127.0.0.1:{port}/vetted", "https://10.0.0.1/vetted", "https://[::1]/vetted"):
            attempt = await closed.post(url, body, {})
            assert (attempt.verdict, attempt.label) == ("give_up", "blocked"), url
        plain = await closed.post("http://example.com/vetted", body, {})  # plain http, even to a public name
        assert plain.label == "blocked" and "plain http" in plain.note
        assert receiver.received("vetted") == []
        # Opened by CIDR (an address in the URL) or by name: called.
        assert (await opened.post(f"http://127.0.0.1:{port}/vetted", body, {})).verdict == "delivered"
        assert (await by_name.post(f"http://localhost:{port}/vetted", body, {})).verdict == "delivered"
        assert len(receiver.received("vetted")) == 2
    finally:
        for sender in (closed, opened, by_name):
            await sender.aclose()


def test_the_gateway_takes_the_webhook_from_a_header(stack: ClientSettings, receiver: Receiver) -> None:
    settings = GatewaySettings(redis_url=stack.redis_url, prefix=stack.prefix, gateway_tokens="wh-token")
    auth = {"authorization": "Bearer wh-token"}
    with serve_gateway(settings) as base:
        bad = httpx.post(f"{base}/v1/jobs", json=HELLO, headers={**auth, "x-moonq-webhook": "gopher://x"})
        assert bad.status_code == 400 and "X-Moonq-Webhook" in bad.json()["error"]["message"]
        url = receiver.script("gateway")
        made = httpx.post(f"{base}/v1/jobs", json=HELLO, headers={**auth, "x-moonq-webhook": url})
        assert made.status_code == 202
        lonely = httpx.post(f"{base}/v1/jobs", json=HELLO, headers={**auth, "x-moonq-webhook-events": "started"})
        assert lonely.status_code == 400 and "X-Moonq-Webhook-Events" in lonely.json()["error"]["message"]
        events = {**auth, "x-moonq-webhook": receiver.script("gateway-events"), "x-moonq-webhook-events": "started"}
        subscribed = httpx.post(f"{base}/v1/jobs", json=HELLO, headers=events)
        assert subscribed.status_code == 202
    [got] = receiver.wait_for("gateway", 1)
    assert verified(got)["data"]["id"] == made.json()["id"]
    types = {verified(r)["type"] for r in receiver.wait_for("gateway-events", 2)}
    assert types == {"job.started", "job.succeeded"}


# ---- a node killed mid-delivery ----------------------------------------------------------------


def test_a_node_killed_mid_delivery_is_taken_over_and_the_receiver_deduplicates(sim: SimServer) -> None:
    with RedisServer() as server, serve_receiver(hold_s=30) as rx:
        settings = make_settings(server.url, prefix=f"whk{uuid.uuid4().hex[:5]}")
        env = node_env(settings, sim.base_url, **FAST_DELIVERY)
        with Client(settings=ClientSettings(redis_url=server.url, prefix=settings.prefix)) as client:
            doomed = WorkerProcess(env).start()
            try:
                job = client.submit(HELLO, webhook=rx.script("killed", "hold"))
                rx.wait_for("killed", 1)  # the node is mid-delivery: the receiver holds its request
                assert doomed.proc is not None
                os.kill(doomed.proc.pid, signal.SIGKILL)
                doomed.proc.wait()
            finally:
                doomed.stop()
            pending = client.redis.xpending(client.keys.deliveries_for(job.id), GROUP)
            assert pending["pending"] == 1  # handed off, taken, never settled
            with WorkerProcess(env):
                tries = rx.wait_for("killed", 2, timeout_s=30)
                wait_until(lambda: backlog(client.redis, client.keys)["queued"] == 0, 10, "the entry settled")
            # What a receiver does: process each webhook-id once.
            processed = {t.headers["webhook-id"]: verified(t) for t in tries}
            assert list(processed) == [delivery_id("webhook", job.id)]
            assert client.redis.xpending(client.keys.deliveries_for(job.id), GROUP)["pending"] == 0
            # Every key left behind has a TTL or an owner (tests/helpers.py OWNED).
            r = redis.Redis.from_url(server.url)
            assert unbounded_keys(r, settings.prefix) == []
            r.close()


# ---- the delivery process ----------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def delivered_total(metrics_url: str) -> float:
    samples = parse_exposition(httpx.get(metrics_url, timeout=5).text)
    return total(samples, "moonq_webhook_deliveries_total", outcome="delivered")


def test_deliveries_run_in_a_child_process_that_lives_and_dies_with_its_node(
    sim: SimServer, receiver: Receiver
) -> None:
    """Off the node's CPU: a child without the API key, restarted if it dies, gone with a killed node;
    what it delivers shows in the node's own /metrics."""
    with RedisServer() as server:
        settings = make_settings(server.url, prefix=f"whp{uuid.uuid4().hex[:5]}")
        port = free_port()
        env = node_env(settings, sim.base_url, MOONQ_METRICS_PORT=str(port), **FAST_DELIVERY)
        with Client(settings=ClientSettings(redis_url=server.url, prefix=settings.prefix)) as client:
            node = WorkerProcess(env).start()
            try:
                assert node.proc is not None
                pid = node.proc.pid
                wait_until(lambda: len(children(pid)) == 1, 10, "the delivery process")
                [child] = children(pid)
                with open(f"/proc/{child}/environ", "rb") as f:
                    assert b"MOONSHOT_API_KEY" not in f.read()
                client.submit(HELLO, webhook=receiver.script("child")).result(timeout=20)
                receiver.wait_for("child", 1)
                metrics_url = f"http://127.0.0.1:{port}/metrics"
                wait_until(lambda: delivered_total(metrics_url) == 1, 5, "the delivery in the node's metrics")

                os.kill(child, signal.SIGKILL)  # the node starts another; deliveries go on
                wait_until(lambda: children(pid) not in ([], [child]), 15, "a new delivery process")
                client.submit(HELLO, webhook=receiver.script("child")).result(timeout=20)
                receiver.wait_for("child", 2)
                wait_until(lambda: delivered_total(metrics_url) == 2, 5, "both deliveries in the node's metrics")

                [child] = children(pid)
                os.kill(pid, signal.SIGKILL)
                node.proc.wait()
                wait_until(lambda: not alive(child), 5, "the delivery process gone with its node")
            finally:
                node.stop()


# ---- what operators see ------------------------------------------------------------------------


def test_the_backlog_is_exported_and_shown_by_top(client: Client, receiver: Receiver) -> None:
    job = client.submit(HELLO, webhook=receiver.script("gone", 404))
    dead(client, delivery_id("webhook", job.id))
    collector = RedisCollector(make_settings(client.settings.redis_url, prefix=client.settings.prefix))
    [family] = [f for f in collector.collect() if f.name == "moonq_webhook_backlog"]
    states = {s.labels["state"]: s.value for s in family.samples}
    assert states["dead"] >= 1 and set(states) == {"queued", "retrying", "dead"}
    exposition = (
        "# TYPE moonq_webhook_backlog gauge\n"
        + "".join(f'moonq_webhook_backlog{{state="{k}"}} {v}\n' for k, v in states.items())
        + "# TYPE moonq_webhook_deliveries counter\n"
        + 'moonq_webhook_deliveries_total{kind="webhook",outcome="delivered"} %s\n'
    )
    prev = Scrape(100.0, {"n": parse_exposition(exposition % 10)})
    cur = Scrape(102.0, {"n": parse_exposition(exposition % 16)})
    row = deliveries_row(prev, cur)
    counts = " | ".join(f"{states[k]:.0f} {k}" for k in ("queued", "retrying", "dead"))
    assert row == ("deliveries", f"{counts} | delivered 3.00/s")
    assert deliveries_row(prev, Scrape(102.0, {"n": {}})) is None  # nodes that report no backlog: no row
