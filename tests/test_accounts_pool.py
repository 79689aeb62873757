"""A pool of upstream accounts (MOONQ_ACCOUNTS_FILE) on a real node: spread, switched, pinned.

Each account is its own simulator (one API key is one quota, docs/moonshot-api.md §8): ``broke``
answers every call with the API's ``exceeded_current_quota_error`` (its balance is gone), ``refused``
holds a key the API refuses (401), ``good`` works. The node is ``celery -A worker worker`` as users
start it; the simulators' request counts show which account each call went to.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

from harness import WorkerProcess
from moonq.settings import ClientSettings
from producers import Client, JobFailed
from simulator import SimConfig, SimServer
from tests.helpers import node_env
from worker.limiter_state import LimiterKeys
from worker.settings import Settings

HELLO = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Which account pays?"}]}


@dataclass
class Pool:
    settings: ClientSettings
    sims: dict[str, SimServer]
    node: WorkerProcess

    def requests(self, account: str) -> int:
        return int(self.sims[account].stats()["requests"])


@pytest.fixture(scope="module")
def pool(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    tmp = tmp_path_factory.mktemp("accounts")
    (tmp / "good.key").write_text("sk-good-key\n")
    with (
        SimServer(SimConfig(seed=1, fault_rate=1.0, fault_kinds=("quota",))) as broke,
        SimServer(SimConfig(seed=2)) as refused,
        SimServer(SimConfig(seed=3)) as good,
    ):
        accounts = {
            "accounts": {
                "broke": {"api_key": "sk-broke-key", "base_url": broke.base_url},
                "refused": {"api_key": "not-a-moonshot-key", "base_url": refused.base_url},
                "good": {"api_key_file": "good.key", "base_url": good.base_url, "rpm": 1000},
            }
        }
        tenants = {
            "tenants": {
                "anyone": {"tokens_sha256": []},
                "stuck": {"tokens_sha256": [], "accounts": ["broke"]},
            }
        }
        (tmp / "accounts.json").write_text(json.dumps(accounts))
        (tmp / "tenants.json").write_text(json.dumps(tenants))
        prefix = f"ap{uuid.uuid4().hex[:6]}"
        settings = ClientSettings(redis_url=redis_url, prefix=prefix, tenants_file=str(tmp / "tenants.json"))
        env = node_env(
            Settings(redis_url=redis_url, prefix=prefix),
            good.base_url,
            MOONQ_ACCOUNTS_FILE=str(tmp / "accounts.json"),
            MOONQ_TENANTS_FILE=settings.tenants_file,
        )
        with WorkerProcess(env) as node:
            yield Pool(settings, {"broke": broke, "refused": refused, "good": good}, node)


def test_an_account_out_of_balance_or_refused_is_skipped_and_the_jobs_complete_on_another(
    pool: Pool, r: redis.Redis
) -> None:
    with Client(settings=pool.settings, tenant="anyone") as client:
        jobs = [client.submit(HELLO) for _ in range(12)]
        results = [job.result(timeout=30) for job in jobs]
        assert all(result.choices[0].finish_reason == "stop" for result in results)
        switches = [
            event
            for job in jobs
            for event in job.events()
            if event.type == "retry" and event.reason == "account_switch"
        ]
    # Each bad account cost at most the calls that were already on their way when it was found out.
    assert {event.account for event in switches} == {"broke", "refused"}
    assert 1 <= pool.requests("broke") <= 12 and 1 <= pool.requests("refused") <= 12
    assert pool.requests("good") == 12
    keys = LimiterKeys.for_prefix(pool.settings.prefix)
    for account in ("broke", "refused"):  # out of rotation fleet-wide, for MOONQ_ACCOUNT_OUT_S
        assert r.pttl(keys.scope_out(f"account:{account}")) > 200_000
    # Nothing of the keys in what the job's events or records hold, nor in the node's log.
    for job in jobs:
        raw = repr(r.hgetall(pool.settings.keys.job(job.id))) + repr(r.xrange(pool.settings.keys.events(job.id)))
        assert "sk-good-key" not in raw and "sk-broke-key" not in raw and "not-a-moonshot-key" not in raw
    assert "sk-good-key" not in pool.node.log() and "not-a-moonshot-key" not in pool.node.log()


def test_a_tenant_pinned_to_the_broke_account_fails_with_the_upstreams_error(pool: Pool, r: redis.Redis) -> None:
    # In rotation (the test above may have taken it out: a pinned tenant would wait for it to come back).
    r.delete(LimiterKeys.for_prefix(pool.settings.prefix).scope_out("account:broke"))
    with Client(settings=pool.settings, tenant="stuck") as client:
        before = pool.requests("good")
        with pytest.raises(JobFailed) as failed:
            client.submit(HELLO).result(timeout=30)
    assert failed.value.error["type"] == "exceeded_current_quota_error"
    assert pool.requests("good") == before  # it never ran on an account it is not pinned to
