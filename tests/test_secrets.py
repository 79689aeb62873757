"""The API key never leaves the workers: not in task messages, job records, events, logs, metrics or CLI output.

Two real ``celery -A worker worker`` nodes on a private redis-server, each with its own distinctive
key: one the simulator accepts (jobs succeed, retry and fail on upstream errors), one it refuses with
401. Everything that could carry a key is collected while the jobs run (every command Redis executes,
through MONITOR; every pub/sub message; the broker's messages before a node takes them) and after
(every key's contents, the nodes' log files and /metrics, the CLI's output), then searched for the
keys and for fragments of them, plain and base64-encoded (kombu base64-encodes message bodies).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import string
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from harness import RedisServer, WorkerProcess, free_port
from moonq.broker import queue_lists
from producers import Client, JobCancelled, JobFailed
from simulator import SimServer
from tests.helpers import FAST, make_settings
from worker.settings import Settings


def random_letters(n: int) -> str:
    # Letters, not hex: a fragment must not turn up by chance among the uuids and digests in Redis.
    return "".join(secrets.choice(string.ascii_letters) for _ in range(n))


# The random part makes each key distinctive; the simulator accepts keys that start with "sk-".
GOOD_KEY = f"sk-moonq-{random_letters(32)}"
BAD_KEY = f"mk-refused-{random_letters(32)}"  # not "sk-": the simulator answers 401
FRAGMENT = 8  # any 8 characters of a key's random part count as a leak (e.g. its last 8)
REQ = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Keep a secret."}], "max_tokens": 16}


def needles(key: str) -> list[str]:
    """What would give the key away: any ``FRAGMENT`` characters of its random part; base64, any 12."""
    secret = key.rsplit("-", 1)[1]
    found = {secret[i : i + FRAGMENT] for i in range(len(secret) - FRAGMENT + 1)}
    for piece in [key] + [secret[i : i + 12] for i in range(len(secret) - 11)]:
        # Inside a longer base64 text the piece starts at one of three byte offsets; the characters that
        # depend only on its own bytes are the same whatever surrounds it (10+ of them: 60 bits).
        for pad in range(3):
            raw = b"\0" * pad + piece.encode()
            found.add(base64.b64encode(raw).decode()[(pad * 8 + 5) // 6 : len(raw) * 8 // 6])
    return sorted(found)


class Recorder:
    """Every command Redis runs (MONITOR) and every pub/sub message (PSUBSCRIBE *), in threads."""

    def __init__(self, url: str) -> None:
        self.commands: list[str] = []
        self.messages: list[str] = []
        self._monitor_client = redis.Redis.from_url(url)
        self._pubsub_client = redis.Redis.from_url(url)
        self._pubsub = self._pubsub_client.pubsub()
        self._pubsub.psubscribe("*")
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, daemon=True), threading.Thread(target=self._listen)]

    def _watch(self) -> None:
        with self._monitor_client.monitor() as monitor:
            while True:
                try:
                    self.commands.append(monitor.next_command()["command"])
                except Exception:  # the connection was closed under it: recording is over
                    return

    def _listen(self) -> None:
        while not self._stop.is_set():
            msg = self._pubsub.get_message(timeout=0.1)
            if msg and msg["type"] == "pmessage":
                self.messages.append(f"{msg['channel']!r} {msg['data']!r}")

    def __enter__(self) -> Recorder:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._threads[1].join(timeout=5)
        self._pubsub.close()
        self._pubsub_client.close()
        self._monitor_client.connection_pool.disconnect()  # ends MONITOR's blocking read
        self._threads[0].join(timeout=5)
        self._monitor_client.close()


def dump_keyspace(r: redis.Redis) -> list[str]:
    """Every key's name and contents, whatever its type."""
    out = []
    for key in r.scan_iter(count=1000):
        kind = str(r.type(key), "ascii")  # type: ignore[arg-type]
        value: Any
        if kind == "string":
            value = r.get(key)
        elif kind == "hash":
            value = r.hgetall(key)
        elif kind == "list":
            value = r.lrange(key, 0, -1)
        elif kind == "set":
            value = r.smembers(key)
        elif kind == "zset":
            value = r.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = r.xrange(key)
        else:
            value = kind
        out.append(f"{key!r} {value!r}")
    return out


def broker_messages(r: redis.Redis, settings: Settings) -> list[str]:
    """The raw messages waiting in the queue, and their decoded bodies."""
    out = []
    for name in queue_lists(settings):
        for raw in r.lrange(name, 0, -1):
            out.append(str(raw, "utf-8"))  # type: ignore[arg-type]
            message = json.loads(raw)
            out.append(base64.b64decode(message["body"]).decode())
    return out


def unacked_messages(r: redis.Redis, settings: Settings) -> list[str]:
    """The messages a node holds (delivered, not yet acknowledged), and their decoded bodies."""
    out = []
    for raw in r.hvals(f"{settings.keys.broker_prefix}unacked"):
        out.append(str(raw, "utf-8"))  # type: ignore[arg-type]
        message = json.loads(raw)[0]
        out.append(base64.b64decode(message["body"]).decode())
    return out


def secret_node_env(settings: Settings, base_url: str, key: str, metrics_port: int) -> dict[str, str]:
    return {
        "REDIS_URL": settings.redis_url,
        "MOONQ_PREFIX": settings.prefix,
        "MOONSHOT_BASE_URL": base_url,
        "MOONSHOT_API_KEY": key,
        **{f"MOONQ_{k.upper()}": str(v) for k, v in FAST.items()},
        "MOONQ_MAX_ATTEMPTS": "2",
        "MOONQ_METRICS_PORT": str(metrics_port),
    }


def cli(settings: Settings, *args: str) -> str:
    # The producer's shell holds the key too: nothing of it may reach the output.
    env = {**os.environ, "REDIS_URL": settings.redis_url, "MOONQ_PREFIX": settings.prefix, "MOONSHOT_API_KEY": GOOD_KEY}
    done = subprocess.run(
        [sys.executable, "-m", "console.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )
    return f"$ moonq {' '.join(args)} -> {done.returncode}\n{done.stdout}{done.stderr}"


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def run_good_node_jobs(client: Client) -> list[str]:
    """Jobs that succeed, retry, fail on upstream errors, get cancelled and re-run; returns their ids."""

    def scripted(*steps: str) -> dict[str, Any]:
        return {**REQ, "sim": {"script": list(steps), "key": uuid.uuid4().hex}}

    ok = [client.submit(REQ), client.submit({**REQ, "stream": True}), client.submit(REQ, idempotency_key="k1")]
    retried = [client.submit(scripted(kind, "ok")) for kind in ("overload", "drop:3", "corrupt")]
    failed = [client.submit(scripted("quota", "ok")), client.submit(scripted("server_error"))]
    stalled = client.submit({**REQ, "sim": {"fault": "stall:5"}})
    return [j.id for j in [*ok, *retried, *failed, stalled]]


def test_the_api_key_never_leaves_the_workers(private_redis: RedisServer, sim: SimServer, tmp_path: Path) -> None:
    good = make_settings(private_redis.url, prefix="good", moonshot_api_key=GOOD_KEY)
    bad = make_settings(private_redis.url, prefix="bad", moonshot_api_key=BAD_KEY)
    ports = {"good": free_port(), "bad": free_port()}
    r = redis.Redis.from_url(private_redis.url)
    texts: dict[str, list[str]] = {}
    with Recorder(private_redis.url) as recorder:
        # The producers hold worker settings (with a key) too: a client that sent its settings would be caught.
        with Client(settings=good) as client, Client(settings=bad) as refused:
            ids = run_good_node_jobs(client)  # queued before any node runs: the raw messages can be read
            bad_ids = [refused.submit(REQ).id for _ in range(2)]
            texts["broker messages"] = broker_messages(r, good) + broker_messages(r, bad)
            assert len(texts["broker messages"]) == 2 * (len(ids) + len(bad_ids))
            nodes = [
                WorkerProcess(
                    secret_node_env(s, sim.base_url, s.moonshot_api_key.get_secret_value(), ports[s.prefix]),  # type: ignore[union-attr]
                    args=("--loglevel", "DEBUG"),  # the most a node ever logs
                    log_path=tmp_path / f"{s.prefix}.log",
                )
                for s in (good, bad)
            ]
            try:
                for node in nodes:
                    node.start(wait=False)
                for node in nodes:
                    node.wait_ready()
                jobs = {job_id: client.job(job_id) for job_id in ids}
                stalled = jobs[ids[-1]]
                while stalled.status() == "queued":
                    time.sleep(0.01)
                # A running job's message sits in kombu's unacked hash until the job ends.
                texts["unacked messages"] = unacked_messages(r, good)
                assert any(stalled.id in m for m in texts["unacked messages"])
                stalled.cancel()
                outcomes = {}
                for job_id, job in [*jobs.items(), *((i, refused.job(i)) for i in bad_ids)]:
                    try:
                        job.result(timeout=30)
                        outcomes[job_id] = "succeeded"
                    except (JobFailed, JobCancelled) as err:
                        outcomes[job_id] = type(err).__name__
                assert list(outcomes.values()).count("JobFailed") == 4 and "JobCancelled" in outcomes.values()
                assert all(refused.job(i).record()["error"].count('"status":401') for i in bad_ids)
                rerun = client.retry(ids[6])  # a dead letter run again
                assert rerun.result(timeout=30).choices
                texts["metrics"] = [httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=10).text for p in ports.values()]
            finally:
                for node in nodes:
                    node.stop()
    texts["worker logs"] = [node.log() for node in nodes]
    texts["redis commands (MONITOR)"] = recorder.commands
    texts["pub/sub messages"] = recorder.messages
    texts["every key's contents"] = dump_keyspace(r)
    failed_id, ok_id = ids[7], ids[0]
    texts["cli output"] = [
        cli(good, "status", failed_id),
        cli(good, "result", failed_id),
        cli(good, "result", ok_id),
        cli(good, "follow", failed_id, "--json"),
        cli(good, "failed"),
        cli(good, "failed", "--json"),
        cli(bad, "failed"),
        cli(bad, "status", bad_ids[0]),
    ]
    r.close()
    # The collection worked: each source holds what it should.
    assert all("DEBUG/MainProcess" in log for log in texts["worker logs"])
    assert "job_succeeded" in texts["worker logs"][0] and "incorrect_api_key_error" in texts["worker logs"][1]
    assert any("moonq_jobs_total" in m for m in texts["metrics"])
    assert any('"type":"completed"' in m for m in texts["pub/sub messages"])
    assert any("Incorrect API key provided" in c for c in texts["cli output"])
    assert len(recorder.commands) > 100
    leaks: dict[str, str] = {}  # source -> the first leak found there, in context
    for where, items in texts.items():
        for text in items:
            for needle in needles(GOOD_KEY) + needles(BAD_KEY):
                at = text.find(needle)
                if at >= 0 and where not in leaks:
                    leaks[where] = f"{needle!r} in …{text[max(0, at - 100) : at + 100]!r}…"
    assert leaks == {}
