"""A Redis that wants a password, an ACL user, TLS: every moonq connection (the Client's, the async
client's, the worker's redis.asyncio runtime, kombu's broker transport, the exporter, `moonq top`)
logs in from the URL alone, and no password shows in logs, /metrics or the terminal.

Real redis-servers: one with ``requirepass`` and an ACL user whose keys are confined to the
deployment's prefix, one serving TLS only with a throwaway CA (made with openssl).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from harness import RedisServer, TlsFiles, WorkerProcess, free_port, make_tls_files
from moonq.broker import producer_app
from moonq.settings import ClientSettings, redact_url
from producers import AsyncClient, Client
from simulator import SimServer
from tests.helpers import make_settings, node_env

DEFAULT_PASSWORD = "default-pw-5e1f9a"  # distinctive, so a leak is easy to find
USER, USER_PASSWORD = "moonq-app", "acl-pw-7c2d4b"
PREFIX = "sec"
# The ACL user only reaches the deployment's keys: moonq's and the broker's all carry the prefix.
# Channels stay open (&*): Celery's broadcast channels (worker control, ping) carry none.
USER_RULES = (f"~{PREFIX}:*", "&*", "+@all")
REQUEST = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Hello, securely"}]}


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[RedisServer]:
    with RedisServer(password=DEFAULT_PASSWORD, users={USER: USER_PASSWORD}, user_rules=USER_RULES) as server:
        yield server


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(tls_files: TlsFiles) -> Iterator[RedisServer]:
    server = RedisServer(tls=tls_files, password=DEFAULT_PASSWORD, users={USER: USER_PASSWORD}, user_rules=USER_RULES)
    try:
        server.start()
    except RuntimeError:
        log = server.log()
        server.stop()
        if "tls" in log.lower() and not os.environ.get("CI"):
            pytest.skip(f"this redis-server does not serve TLS (built without it?): {log[-300:]}")
        raise
    yield server
    server.stop()


@pytest.fixture(params=["acl_user", "default_user_password", "tls_acl_user"])
def secured(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(URL, the password in it)."""
    if request.param == "acl_user":
        return request.getfixturevalue("acl_redis").url_for(USER), USER_PASSWORD
    if request.param == "default_user_password":
        return request.getfixturevalue("acl_redis").url_for(None), DEFAULT_PASSWORD
    url = request.getfixturevalue("tls_redis").url_for(USER)
    assert url.startswith(f"rediss://{USER}:") and "ssl_ca_certs=" in url
    return url, USER_PASSWORD


def test_end_to_end_on_a_secured_redis(secured: tuple[str, str], sim: SimServer) -> None:
    url, secret = secured
    settings = make_settings(url, prefix=PREFIX, queue=f"q{uuid.uuid4().hex[:8]}")
    port = free_port()
    env = node_env(
        settings, sim.base_url, MOONQ_QUEUE=settings.queue, MOONQ_METRICS_PORT=str(port), MOONQ_METRICS_HOST="127.0.0.1"
    )
    with WorkerProcess(env) as node, Client(settings=settings) as client:
        job = client.submit(REQUEST)
        events = list(job.events())
        completed = events[-1].result
        assert events[-1].type == "completed" and completed
        assert job.result(timeout=20).choices[0].message.content == completed["choices"][0]["message"]["content"]

        async def follow() -> list[str]:
            async with AsyncClient(settings=settings) as aclient:
                ajob = await aclient.submit(REQUEST)
                return [e.type async for e in ajob.events()]

        assert asyncio.run(follow())[-1] == "completed"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        # Read at scrape time: the queue from the broker (kombu's lists), the limiter from Redis.
        assert "moonq_queue_depth{" in metrics and "moonq_ratelimit_cooldown_seconds" in metrics
        top = subprocess.run(
            [sys.executable, "-m", "console.cli", "--redis-url", url, "top", "--once", "--interval", "0.3"],
            env={**os.environ, "MOONQ_PREFIX": PREFIX},
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Found through Redis and scraped (an earlier test's node on this server may be listed as down).
        assert top.returncode == 0 and "1 up /" in top.stdout, top.stdout + top.stderr
        assert f"down        http://127.0.0.1:{port}/" not in top.stdout
    log = node.log()
    assert "event=job_succeeded" in log and "Traceback" not in log
    assert ":**@127.0.0.1" in log  # Celery's banner names the broker, password masked
    assert "insecure" not in log.lower()  # kombu did not fall back to an unverified TLS connection
    for text in (log, metrics, top.stdout, top.stderr):
        assert secret not in text


def test_a_wrong_password_fails_without_showing_it(acl_redis: RedisServer) -> None:
    wrong = "not-the-pw-93b1"
    settings = ClientSettings(redis_url=acl_redis.url_for(USER, wrong), prefix=PREFIX)
    with Client(settings=settings) as client, pytest.raises(redis.AuthenticationError) as err:
        client.submit(REQUEST)
    assert wrong not in str(err.value) and wrong not in repr(settings) and wrong not in str(settings)
    assert f"redis://{USER}:***@127.0.0.1:{acl_redis.port}/0" in repr(settings)


def test_tls_is_verified_by_redis_py_and_by_the_broker_transport(tls_redis: RedisServer) -> None:
    # Without the CA the server's certificate is refused, by redis-py (REDIS_URL) and by kombu
    # (the broker), which on its own would connect to rediss:// without verifying anything.
    no_ca = tls_redis.url_for(USER).split("?")[0]
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis.Redis.from_url(no_ca).ping()
    for url, verifies in ((no_ca, False), (tls_redis.url_for(USER), True)):
        app = producer_app(ClientSettings(redis_url=url, prefix=PREFIX))
        try:
            with app.connection_for_write() as conn:
                if verifies:
                    conn.ensure_connection(max_retries=1, interval_start=0)
                else:
                    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
                        conn.ensure_connection(max_retries=1, interval_start=0)
        finally:
            app.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:p%40ss@h/0", "redis://user:***@h/0"),
        ("redis://user:pa/ss@h/0", "redis://user:***@h/0"),
        ("rediss://u:pw@h:6380/0?ssl_ca_certs=/etc/ca.pem", "rediss://u:***@h:6380/0?ssl_ca_certs=/etc/ca.pem"),
        ("amqp://guest:pw@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
        ("redis://h/0?password=pw&db=1", "redis://h/0?password=***&db=1"),
        ("sentinel://:pw@a:26379;sentinel://:pw@b:26379", "sentinel://:***@a:26379;sentinel://:***@b:26379"),
        ("redis://user@h/0", "redis://user@h/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_settings_never_show_passwords() -> None:
    settings = ClientSettings(redis_url="redis://u:hunter2@h/0", broker_url="amqp://g:hunter3@r//")
    assert "hunter" not in repr(settings) and "hunter" not in str(settings)
    assert settings.redis_url.endswith("u:hunter2@h/0")  # the value itself is intact
