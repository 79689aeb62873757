"""Tenants: each sees, follows, cancels and retries only its own jobs (docs/tenants.md).

The gateway is the boundary: a bearer token speaks for one tenant (or is an operator's), and
another tenant's job id answers exactly like an unknown one. Python clients are scoped the same way
by the tenant they name. Idempotency keys, dead letters, models and priorities are per tenant; a
tenant's default webhook URL and secrets apply to its jobs. Real parts: a tenants file on disk, a
real node, the gateway over HTTP, a webhook receiver checked with the Standard Webhooks library.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from gateway.app import GatewaySettings, create_app
from harness import RedisServer, WorkerProcess
from moonq.configfile import ConfigFileError
from moonq.deliveries import backlog, failed_deliveries
from moonq.indexes import newest_first
from moonq.keys import GROUPS, group_of
from moonq.settings import ClientSettings
from moonq.tenants import hash_token
from moonq.webhooks import delivery_id
from producers import Client, InvalidRequest, JobNotFound, TenantModelNotAllowed
from simulator import SimServer
from tests.helpers import active_count, make_settings, node_env, serve_gateway, wait_until
from tests.webhook_receiver import serve_receiver

HELLO = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "Hello, tenant."}]}
TOKENS = {"search": "search-token", "reports": "reports-token", "ops": "operator-token"}


def whsec() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def tenants_file(path: Path, **search_extra: Any) -> Path:
    path.write_text(
        json.dumps(
            {
                "operators": {"tokens_sha256": [hash_token(TOKENS["ops"])]},
                "tenants": {
                    "search": {"tokens_sha256": [hash_token(TOKENS["search"])], "max_priority": 3, **search_extra},
                    "reports": {"tokens_sha256": [hash_token(TOKENS["reports"])], "models": ["moonshot-v1-*"]},
                },
            }
        )
    )
    return path


@pytest.fixture
def scoped(redis_url: str, tmp_path: Path) -> ClientSettings:
    """Client settings on a fresh prefix with the tenants file (no node: nothing runs)."""
    prefix = f"tn{uuid.uuid4().hex[:6]}"
    return ClientSettings(redis_url=redis_url, prefix=prefix, tenants_file=str(tenants_file(tmp_path / "t.json")))


@pytest.fixture
def clients(scoped: ClientSettings) -> Iterator[dict[str, Client]]:
    with (
        Client(settings=scoped, tenant="search") as search,
        Client(settings=scoped, tenant="reports") as reports,
        Client(settings=scoped) as operator,
    ):
        yield {"search": search, "reports": reports, "operator": operator}


def test_another_tenants_job_is_not_found_in_python(clients: dict[str, Client]) -> None:
    job = clients["search"].submit(HELLO)
    assert job.record()["tenant"] == "search"
    theirs = clients["reports"].job(job.id)
    for read in (theirs.record, theirs.status, theirs.cancel, lambda: list(theirs.events())):
        with pytest.raises(JobNotFound):
            read()
    with pytest.raises(JobNotFound):
        theirs.result(timeout=1)
    assert clients["operator"].job(job.id).status() == "queued"  # a client naming no tenant sees all
    assert clients["search"].job(job.id).cancel() is True


def test_idempotency_keys_are_per_tenant(clients: dict[str, Client]) -> None:
    ours = clients["search"].submit(HELLO, idempotency_key="order-42")
    assert clients["search"].submit(HELLO, idempotency_key="order-42").id == ours.id
    request = {**HELLO, "model": "moonshot-v1-8k"}
    theirs = clients["reports"].submit(request, idempotency_key="order-42")
    assert theirs.id != ours.id and theirs.record()["tenant"] == "reports"


def test_a_tenants_rules_refuse_before_anything_is_enqueued(clients: dict[str, Client], scoped: ClientSettings) -> None:
    with pytest.raises(TenantModelNotAllowed) as refused:
        clients["reports"].submit(HELLO)
    assert refused.value.type == "tenant_model_not_allowed_error" and "reports" in str(refused.value)
    with pytest.raises(TenantModelNotAllowed, match=r"requests\.1\.model"):
        clients["reports"].submit_many([{**HELLO, "model": "moonshot-v1-8k"}, HELLO])
    with pytest.raises(InvalidRequest) as urgent:
        clients["search"].submit(HELLO, priority=0)
    assert urgent.value.errors[0][0] == "priority" and "3 to 9" in urgent.value.errors[0][1]
    for tenant, rule in ((None, "is required"), ("nobody", "is not a tenant")):
        with pytest.raises(InvalidRequest) as caught:
            clients["operator"].submit(HELLO, tenant=tenant)
        assert caught.value.errors[0][0] == "tenant" and rule in caught.value.errors[0][1]
    assert not active_count(clients["operator"].redis, scoped.keys)


def test_the_gateway_scopes_every_route_to_the_tokens_tenant(scoped: ClientSettings) -> None:
    settings = GatewaySettings(redis_url=scoped.redis_url, prefix=scoped.prefix, tenants_file=scoped.tenants_file)

    def auth(who: str, **extra: str) -> dict[str, str]:
        return {"authorization": f"Bearer {TOKENS[who]}", **extra}

    with serve_gateway(settings) as base, httpx.Client(base_url=base) as http:
        made = http.post("/v1/jobs", json=HELLO, headers=auth("search"))
        assert made.status_code == 202
        job_id = made.json()["id"]
        unknown = http.get(f"/v1/jobs/{uuid.uuid4()}", headers=auth("reports"))
        for method, path in (("GET", ""), ("GET", "/events"), ("DELETE", "")):
            theirs = http.request(method, f"/v1/jobs/{job_id}{path}", headers=auth("reports"))
            assert theirs.status_code == 404 and theirs.json()["error"]["type"] == unknown.json()["error"]["type"]
        seen = http.get(f"/v1/jobs/{job_id}", headers=auth("ops")).json()
        assert (seen["id"], seen["tenant"]) == (job_id, "search")
        assert http.get(f"/v1/jobs/{job_id}", headers=auth("search")).json()["tenant"] == "search"

        lost = http.post("/v1/jobs", json=HELLO, headers=auth("ops"))
        assert lost.status_code == 400 and "X-Moonq-Tenant" in lost.json()["error"]["message"]
        for_search = http.post("/v1/jobs", json=HELLO, headers=auth("ops", **{"x-moonq-tenant": "search"}))
        assert http.get(f"/v1/jobs/{for_search.json()['id']}", headers=auth("search")).status_code == 200
        posing = http.post("/v1/jobs", json=HELLO, headers=auth("search", **{"x-moonq-tenant": "reports"}))
        assert posing.status_code == 400
        model = http.post("/v1/jobs", json=HELLO, headers=auth("reports"))
        assert model.status_code == 403 and model.json()["error"]["type"] == "tenant_model_not_allowed_error"
        assert http.post("/v1/jobs", json=HELLO, headers={"authorization": "Bearer nobody"}).status_code == 401


def test_the_gateway_refuses_a_tenants_file_beside_gateway_tokens(scoped: ClientSettings, tmp_path: Path) -> None:
    both = GatewaySettings(redis_url=scoped.redis_url, tenants_file=scoped.tenants_file, gateway_tokens="t")
    with pytest.raises(ValueError, match="MOONQ_TENANTS_FILE or MOONQ_GATEWAY_TOKENS"):
        create_app(both)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tenants": {"x": {"tokens_sha256": ["nothex"]}}}))
    with pytest.raises(ConfigFileError, match=r"tenants\.x\.tokens_sha256"):
        create_app(GatewaySettings(redis_url=scoped.redis_url, tenants_file=str(bad)))


def test_dead_letters_and_webhooks_follow_the_tenant(sim: SimServer, tmp_path: Path) -> None:
    """A real node: each tenant lists its own dead letters; a tenant's default webhook is signed with its secret."""
    tenant_secret, node_secret = whsec(), whsec()
    with RedisServer() as server, serve_receiver() as rx:
        url = rx.script("tenant-default")
        path = tenants_file(tmp_path / "t.json", webhook_url=url, webhook_secrets=tenant_secret)
        settings = make_settings(server.url, prefix=f"tw{uuid.uuid4().hex[:5]}", tenants_file=str(path))
        env = node_env(
            settings,
            sim.base_url,
            MOONQ_TENANTS_FILE=str(path),
            MOONQ_WEBHOOK_SECRET=node_secret,
            MOONQ_WEBHOOK_ALLOW="localhost",
        )
        client_settings = ClientSettings(redis_url=server.url, prefix=settings.prefix, tenants_file=str(path))
        with (
            WorkerProcess(env),
            Client(settings=client_settings, tenant="search") as search,
            Client(settings=client_settings, tenant="reports") as reports,
            Client(settings=client_settings) as operator,
        ):
            failing = {**HELLO, "model": "moonshot-v1-8k", "sim": {"fault": "quota"}}
            ours, theirs = search.submit(failing), reports.submit(failing)
            for job in (operator.job(ours.id), operator.job(theirs.id)):
                wait_until(partial(lambda j: j.status() == "failed", job), 20, "the job failed")
            assert [row["id"] for row in search.failed()] == [ours.id]
            assert [row["id"] for row in reports.failed()] == [theirs.id]
            assert {row["id"] for row in operator.failed()} == {ours.id, theirs.id}
            with pytest.raises(JobNotFound):
                reports.retry(ours.id)
            assert search.retry(ours.id).record()["tenant"] == "search"

            done = search.submit(HELLO)
            done.result(timeout=20)
            # search's three jobs (failed, its re-run, done) each reach search's URL; reports has none.
            got = [r for r in rx.wait_for("tenant-default", 3) if json.loads(r.body)["data"]["id"] == done.id]
            body = Webhook(tenant_secret).verify(got[0].body, got[0].headers)
            assert (body["data"]["tenant"], body["type"]) == ("search", "job.succeeded")
            with pytest.raises(Exception, match="signature"):
                Webhook(node_secret).verify(got[0].body, got[0].headers)


def test_state_reads_leave_the_request_out(clients: dict[str, Client]) -> None:
    """status() and record(fields) read only what they name (a request can be 100 MB), scoped as ever."""
    job = clients["search"].submit(HELLO)
    assert set(job.record(("model",))) == {"status", "tenant", "model"}
    assert "envelope" in job.record()  # all of it only when asked for all
    with pytest.raises(JobNotFound):
        clients["reports"].job(job.id).record(("model",))


def test_each_tenant_has_its_own_recent_jobs_index(clients: dict[str, Client], scoped: ClientSettings) -> None:
    """The console lists a tenant's jobs from its own index, however many other tenants' jobs there are."""
    ours = [clients["search"].submit(HELLO).id for _ in range(2)]
    theirs = [j.id for j in clients["reports"].submit_many([{**HELLO, "model": "moonshot-v1-8k"}] * 3)]
    r = clients["operator"].redis

    def listed(tenant: str) -> set[str]:
        return {job_id for job_id, _ in newest_first(r, [scoped.keys.recent_in(g, tenant) for g in GROUPS], 1000)}

    assert listed("search") == set(ours) and listed("reports") == set(theirs)
    everyone = newest_first(r, [scoped.keys.recent_in(g) for g in GROUPS], 1000)
    assert len(everyone) == 5 and 0 < r.ttl(scoped.keys.recent_in(group_of(ours[0]), "search")) <= scoped.result_ttl_s


def test_dead_deliveries_are_listed_and_redelivered_per_tenant(
    clients: dict[str, Client], scoped: ClientSettings
) -> None:
    """`moonq --tenant T webhooks failed` lists T's dead deliveries only; T cannot redeliver another's."""
    r, keys = clients["operator"].redis, scoped.keys
    ours, theirs = clients["search"].submit(HELLO), clients["reports"].submit({**HELLO, "model": "moonshot-v1-8k"})
    for job, tenant in ((ours, "search"), (theirs, "reports")):  # as a node leaves a delivery that gave up
        did = delivery_id("webhook", job.id)
        r.hset(
            keys.delivery(did, job.id), mapping={"kind": "webhook", "job": job.id, "tenant": tenant, "attempts": "3"}
        )
        r.zadd(keys.deliveries_dead_in(group_of(job.id)), {did: time.time()})
    assert [row["job_id"] for row in failed_deliveries(r, keys, 10, "search")] == [ours.id]
    assert {row["tenant"] for row in failed_deliveries(r, keys, 10)} == {"search", "reports"}
    env = {**os.environ, "REDIS_URL": scoped.redis_url, "MOONQ_PREFIX": scoped.prefix}
    env["MOONQ_TENANTS_FILE"] = scoped.tenants_file
    cli = [sys.executable, "-m", "console.cli", "--tenant", "search", "webhooks"]
    listed = subprocess.run([*cli, "failed", "--json"], env=env, capture_output=True, text=True, timeout=30)
    assert [row["id"] for row in json.loads(listed.stdout)] == [delivery_id("webhook", ours.id)]
    refused = subprocess.run([*cli, "redeliver", delivery_id("webhook", theirs.id)], env=env, timeout=30)
    assert refused.returncode == 3 and backlog(r, keys)["dead"] == 2
