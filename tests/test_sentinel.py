"""Redis Sentinel: the ``redis+sentinel://`` URL, and a failover mid-run on real servers.

A primary, a replica and three sentinels (harness ``SentinelSet``) run a real node
(``celery -A worker worker``) and a real producer; the primary is SIGKILLed while jobs stream and
the jobs must still complete, read back through the new primary. What a failover may lose, and
why, is in docs/guarantees.md ("Sentinel failover").
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from gateway.app import GatewaySettings
from harness import SentinelSet, WorkerProcess
from moonq.broker import broker_config
from moonq.connect import resilient_redis
from moonq.errors import JobNotFound
from moonq.keys import Keys
from moonq.redisurl import SentinelUrl, kombu_sentinel, parse_sentinel_url
from moonq.settings import ClientSettings, is_redis_url, redact_url
from producers import Client
from simulator import SimConfig, SimServer
from tests.helpers import (
    API_KEY,
    assert_one_clean_ending,
    make_settings,
    node_env,
    serve_gateway,
    streaming,
    wait_until,
)
from worker.app import celery_config
from worker.callbacks import callback_app

# About 2 s per answer: 40 one-token chunks 50 ms apart, after 0.2 s.
STREAMING_SIM = SimConfig(
    seed=16, first_token_latency_s=0.2, chunk_interval_s=0.05, tokens_per_chunk=1, answer_tokens=(40, 40)
)
REQUEST = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Stream through a failover."}]}


# ---- (a) the URL ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://h1:26379,h2:26380/mymaster/2",
            SentinelUrl(sentinels=(("h1", 26379), ("h2", 26380)), master="mymaster", db=2),
        ),
        # The port defaults to Sentinel's, the db to 0; the scheme is case-insensitive.
        ("REDIS+SENTINEL://h1,h2:7/m", SentinelUrl(sentinels=(("h1", 26379), ("h2", 7)), master="m")),
        ("redis+sentinel://h1/m/", SentinelUrl(sentinels=(("h1", 26379),), master="m")),
        (
            "redis+sentinel://app:p%40ss%2Fw@h1:1/m/3?sentinel_password=s%26p&sentinel_username=watch",
            SentinelUrl(
                sentinels=(("h1", 1),),
                master="m",
                db=3,
                username="app",
                password="p@ss/w",
                sentinel_username="watch",
                sentinel_password="s&p",
            ),
        ),
        # A password only (the default user), an unescaped '@' in it, IPv6 sentinels.
        (
            "redis+sentinel://:p@w@[::1]:26379,[fe80::2]/m/0",
            SentinelUrl(sentinels=(("::1", 26379), ("fe80::2", 26379)), master="m", password="p@w"),
        ),
        (
            "redis+sentinel://h1/m/0?ssl=true&ssl_ca_certs=/ca.pem&socket_timeout=2",
            SentinelUrl(
                sentinels=(("h1", 26379),),
                master="m",
                ssl=True,
                params=(("ssl_ca_certs", "/ca.pem"), ("socket_timeout", "2")),
            ),
        ),
    ],
)
def test_every_form_of_the_sentinel_url_parses(url: str, expected: SentinelUrl) -> None:
    assert parse_sentinel_url(url) == expected
    assert is_redis_url(url)


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("redis://h1/m/0", "the scheme must be redis+sentinel://"),
        ("redis+sentinel:///m/0", "a sentinel address is empty"),
        ("redis+sentinel://h1,,h2/m/0", "a sentinel address is empty"),
        ("redis+sentinel://h1:port/m/0", "sentinel 'h1' has port 'port'"),
        ("redis+sentinel://h1:0/m/0", "sentinel 'h1' has port '0'"),
        ("redis+sentinel://h1:70000/m/0", "sentinel 'h1' has port '70000'"),
        ("redis+sentinel://:26379/m/0", "sentinel address ':26379' has no host"),
        ("redis+sentinel://[::1/m/0", "is not [ipv6]:port"),
        ("redis+sentinel://h1", "the master name (the first path segment"),
        ("redis+sentinel://h1//0", "the master name (the first path segment"),
        ("redis+sentinel://h1/m/zero", "the db (the second path segment) must be a number, not 'zero'"),
        ("redis+sentinel://h1/m/0/extra", "unexpected path after the db: /extra"),
        ("redis+sentinel://h1/m/0?ssl=maybe", "ssl must be true or false, not 'maybe'"),
    ],
)
def test_a_wrong_sentinel_url_is_refused_naming_the_wrong_part(url: str, names: str) -> None:
    with pytest.raises(ValueError, match="Sentinel URL") as err:
        parse_sentinel_url(url)
    assert names in str(err.value)


def test_settings_refuse_a_wrong_sentinel_url_at_startup_without_showing_its_password() -> None:
    with pytest.raises(ValueError, match="the master name") as err:
        ClientSettings(redis_url="redis+sentinel://:hunter2@h1/?sentinel_password=sekrit")
    assert "hunter2" not in str(err.value) and "sekrit" not in str(err.value)
    # kombu's own form has no master name: moonq asks for its own.
    with pytest.raises(ValueError, match=r"redis\+sentinel://host1:26379"):
        ClientSettings(broker_url="sentinel://:hunter2@h1:26379")
    url = "redis+sentinel://app:hunter2@h1,h2/m/0?sentinel_password=sekrit"
    assert redact_url(url) == "redis+sentinel://app:***@h1,h2/m/0?sentinel_password=***"
    assert "hunter2" not in repr(ClientSettings(redis_url=url)) and "sekrit" not in repr(ClientSettings(redis_url=url))


def test_the_broker_is_kombus_sentinel_transport_derived_from_the_url() -> None:
    url = "redis+sentinel://app:p%40ss@h1:1,h2:2/mymaster/3?sentinel_password=sp"
    settings = make_settings(url)
    config = broker_config(settings)
    assert config["broker_url"] == "sentinel://app:p%40ss@h1:1/3;sentinel://app:p%40ss@h2:2/3"
    options = config["broker_transport_options"]
    assert options["master_name"] == "mymaster"
    assert options["sentinel_kwargs"] == {"password": "sp"}
    # Still moonq's Redis broker: the prefix, ten priority lists, and the node's own transport.
    assert options["global_keyprefix"] == settings.keys.broker_prefix
    assert options["priority_steps"] == list(range(10))
    # The node: moonq's transport on one URL (kombu would switch a failover list to its own transport
    # on an error), the sentinels in a transport option.
    node = celery_config(settings)
    assert node["broker_transport"] == "worker.transport:SentinelTransport"
    assert node["broker_url"] == "sentinel://app:p%40ss@h1:1/3"
    assert node["broker_transport_options"]["sentinels"] == [["h1", 1], ["h2", 2]]
    assert node["broker_transport_options"]["visibility_timeout"] == settings.visibility_timeout_s
    assert "broker_use_ssl" not in config
    # Celery callbacks on a Sentinel broker (MOONQ_CALLBACK_BROKER_URL) get kombu's form too.
    callbacks = callback_app(url)
    try:
        assert callbacks.conf.broker_url == config["broker_url"]
        assert callbacks.conf.broker_transport_options["master_name"] == "mymaster"
    finally:
        callbacks.close()


def test_tls_goes_to_the_data_nodes_and_the_sentinels_and_verifies_by_default() -> None:
    parsed = parse_sentinel_url("redis+sentinel://h1/m/0?ssl=true&ssl_ca_certs=/ca.pem&sentinel_password=sp")
    data = parsed.connection_kwargs()
    assert data["ssl"] is True and data["ssl_cert_reqs"] == "required" and data["ssl_ca_certs"] == "/ca.pem"
    assert parsed.sentinel_kwargs() == {
        "ssl": True,
        "ssl_cert_reqs": "required",
        "ssl_ca_certs": "/ca.pem",
        "password": "sp",
    }
    kombu = kombu_sentinel("redis+sentinel://h1/m/0?ssl=true&ssl_ca_certs=/ca.pem&ssl_check_hostname=false")
    assert kombu.use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem", "ssl_check_hostname": False}
    none = kombu_sentinel("redis+sentinel://h1/m/0?ssl=true&ssl_cert_reqs=none")
    assert none.use_ssl == {"ssl_cert_reqs": ssl.CERT_NONE}


# ---- (b) a failover mid-run, (c) the gateway -----------------------------------------------------


@pytest.fixture
def sentinels() -> Iterator[SentinelSet]:
    # Passwords on both sides, so the credentials of the URL reach every client and the broker.
    with SentinelSet(password="data-pw", sentinel_password="sentinel-pw") as s:
        yield s


@pytest.fixture(scope="module")
def streaming_sim() -> Iterator[SimServer]:
    with SimServer(STREAMING_SIM) as server:
        yield server


class FirstWrite:
    """Polls the surviving server from the kill on; notes when a job's event seq first moves there.

    Before the kill the replica only mirrors the primary; after it nothing replicates to it, so
    the first change is the first event a node wrote on it as the new primary.
    """

    def __init__(self, port: int, password: str, job_ids: list[str], prefix: str) -> None:
        self.client = redis.Redis(port=port, password=password, socket_timeout=1.0)
        self.keys = [Keys(prefix).job(job_id) for job_id in job_ids]
        self.at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _seqs(self) -> list[bytes | None]:
        pipe = self.client.pipeline(transaction=False)
        for key in self.keys:
            pipe.hget(key, "seq")
        return pipe.execute()

    def _run(self) -> None:
        baseline = self._seqs()
        while not self._stop.is_set():
            try:
                if self._seqs() != baseline:
                    self.at = time.monotonic()
                    return
            except (redis.RedisError, OSError):  # the replica is busy becoming the primary
                pass
            time.sleep(0.005)

    def __enter__(self) -> FirstWrite:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.client.close()


def test_a_command_in_flight_at_the_kill_is_retried_on_the_new_primary(sentinels: SentinelSet) -> None:
    """A blocking pop waits on the primary when it dies: its retries must ask the sentinels again.

    redis-py's own Sentinel connection reconnects a command's broken connection to the address it
    had (the dead primary) until the retries run out; moonq's goes through the sentinels (moonq/redisurl.py).
    """

    async def main() -> bytes | None:
        client = resilient_redis(sentinels.url(), max_connections=4)

        async def pop() -> Any:
            return await client.blpop(["sentinel-test"], timeout=0)

        try:
            waiting = asyncio.create_task(pop())
            await asyncio.sleep(0.3)  # the BLPOP is on the primary's socket
            old = await asyncio.to_thread(sentinels.kill_primary)
            new = await asyncio.to_thread(sentinels.wait_for_new_primary, old.port)
            await asyncio.sleep(2)  # the pop's retries reach the new primary within a second of its promotion
            direct = redis.Redis(port=new.port, password="data-pw")
            direct.rpush("sentinel-test", b"after the failover")
            direct.close()
            popped = await asyncio.wait_for(waiting, timeout=10)
            return popped[1] if popped else None
        finally:
            await client.aclose()

    assert asyncio.run(main()) == b"after the failover"


def test_jobs_streaming_through_a_primary_kill_complete_on_the_new_primary(
    sentinels: SentinelSet, streaming_sim: SimServer
) -> None:
    settings = make_settings(sentinels.url(), prefix=f"s{uuid.uuid4().hex[:8]}")
    env = node_env(settings, streaming_sim.base_url)
    with Client(settings=settings) as client, WorkerProcess(env) as node:
        jobs = [client.submit(REQUEST) for _ in range(20)]
        ids = [job.id for job in jobs]
        wait_until(lambda: streaming(client, ids), 20, "all jobs streaming")
        survivor = sentinels.replica
        old = sentinels.kill_primary()
        killed_at = time.monotonic()
        with FirstWrite(survivor.port, "data-pw", ids, settings.prefix) as first:
            new = sentinels.wait_for_new_primary(old.port)
            promoted_s = time.monotonic() - killed_at
            results = [job.result(timeout=45) for job in jobs]
        assert new is survivor
        assert first.at is not None
        first_event_s = first.at - killed_at
        print(f"\nfailover: sentinels named the new primary {promoted_s:.2f}s after the kill; ")
        print(f"first event written on it {first_event_s:.2f}s after the kill")
        # The node rode the failover out: the same process, its streams kept (no retry at all) ...
        assert node.proc is not None and node.proc.poll() is None
        # ... and its consumer found the new primary: a job submitted now runs (on Celery's reconnect
        # schedule, 2 s then 4 s), through moonq's transport, not kombu's.
        assert client.submit(REQUEST).result(timeout=20).choices[0].finish_reason == "stop"
        assert "Connected to worker.transport:SentinelTransport" in node.log().rpartition("Cannot connect")[2]
        for job, result in zip(jobs, results, strict=True):
            assert result.choices[0].finish_reason == "stop"
            events = list(job.events())
            assert_one_clean_ending(events)
            assert not [e for e in events if e.type == "retry"], events
    # Everything above was read through the new primary, the only server left.
    direct = redis.Redis(port=new.port, password="data-pw")
    assert all(direct.hget(settings.keys.job(i), "status") == b"succeeded" for i in ids)
    direct.close()
    assert first_event_s < 15


def test_a_failover_rewinds_to_what_the_replica_had() -> None:
    """The limit docs/guarantees.md ("Sentinel failover") states, shown: replication is asynchronous,
    so a submit the old primary acknowledged but never sent on is gone after the failover, while
    everything the replica had received is there."""
    with SentinelSet(password="data-pw", replication_proxy=True) as sentinels:
        assert sentinels.replication_link is not None
        settings = make_settings(sentinels.url(), prefix=f"r{uuid.uuid4().hex[:8]}")
        replica = redis.Redis(port=sentinels.replica.port, password="data-pw")
        with Client(settings=settings) as client:
            kept = client.submit(REQUEST)
            wait_until(lambda: replica.exists(settings.keys.job(kept.id)) == 1, 5, "the replica has the job")
            sentinels.replication_link.blackhole(60)  # the primary goes on acknowledging; the replica hears nothing
            lost = client.submit(REQUEST)
            assert lost.status() == "queued"  # acknowledged, and readable on the old primary
            old = sentinels.kill_primary()
            sentinels.replication_link.cut()  # what it held back dies with the primary's connection
            sentinels.wait_for_new_primary(old.port)
            assert kept.status() == "queued"
            with pytest.raises(JobNotFound):
                lost.status()
        replica.close()


def test_the_gateway_serves_a_job_on_a_sentinel_url(sentinels: SentinelSet, sim: SimServer) -> None:
    settings = make_settings(sentinels.url(db=1), prefix=f"g{uuid.uuid4().hex[:8]}")
    env = node_env(settings, sim.base_url)
    gateway = GatewaySettings(redis_url=settings.redis_url, prefix=settings.prefix, gateway_tokens="gw-token")
    with WorkerProcess(env), serve_gateway(gateway) as url:
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Hello over Sentinel"}]},
            headers={"Authorization": "Bearer gw-token"},
            timeout=30,
        )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["message"]["content"]
    job_id = answer.headers["X-Moonq-Job-Id"]
    # In db 1 of the primary, under the URL's credentials.
    port = sentinels.primary_port()
    assert port is not None
    direct = redis.Redis(port=port, password="data-pw", db=1)
    assert direct.hget(settings.keys.job(job_id), "status") == b"succeeded"
    direct.close()
    assert API_KEY not in answer.text
