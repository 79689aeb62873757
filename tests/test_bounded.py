"""Bounded resources: every Redis key moonq writes expires or has an owner; replay logs are capped.

One real ``celery -A worker worker`` node on a private redis-server (so every key in it comes from
this module) runs a realistic mix; then every key is checked. The node keeps at most ``CAP``
events per job, and the simulator here answers at length, so the cap is exercised on every long
job: followers that arrive late, mid-stream, or lose their pub/sub connection still end.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from console.batch import run_batch
from gateway.app import GatewaySettings, create_app
from harness import RedisServer, WorkerProcess, free_port
from moonq.settings import ClientSettings
from producers import AsyncClient, Client, InvalidRequest, JobCancelled, JobFailed
from simulator import SimConfig, SimServer
from simulator.server import serve_in_thread
from tests.helpers import API_KEY, FAST, unbounded_keys

CAP = 40  # MOONQ_MAX_EVENTS_PER_JOB of the node under test
ANSWER = 300  # tokens of a full-length answer: one delta each, so ~300 events per long job
TOKEN = "gw-bounded-token"
SHORT = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Briefly, please."}], "max_tokens": 8}
LONG = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "At length, please."}]}


@pytest.fixture(scope="module")
def long_sim() -> Iterator[SimServer]:
    # One delta per token, a little pause between chunks: a long job lasts about a second.
    cfg = SimConfig(seed=7, answer_tokens=(ANSWER, ANSWER), tokens_per_chunk=1, chunk_interval_s=0.003)
    with SimServer(cfg) as server:
        yield server


@pytest.fixture(scope="module")
def stack(long_sim: SimServer) -> Iterator[dict[str, Any]]:
    """A private Redis with one real node (limits on, metrics on, a small event cap) and its settings."""
    with RedisServer() as server:
        settings = ClientSettings(redis_url=server.url, prefix=f"b{uuid.uuid4().hex[:6]}")
        env = {
            "REDIS_URL": server.url,
            "MOONQ_PREFIX": settings.prefix,
            "MOONSHOT_BASE_URL": long_sim.base_url,
            "MOONSHOT_API_KEY": API_KEY,
            **{f"MOONQ_{k.upper()}": str(v) for k, v in FAST.items()},
            "MOONQ_METRICS_PORT": str(free_port()),  # announces the node in P:nodes, as in production
            "MOONQ_RPM": "100000",
            "MOONQ_TPM": "100000000",
            "MOONQ_MAX_INFLIGHT": "50",
            "MOONQ_MAX_ATTEMPTS": "3",
            "MOONQ_MAX_RETRY_AFTER_S": "0.2",
            "MOONQ_MAX_EVENTS_PER_JOB": str(CAP),
        }
        with WorkerProcess(env) as node:
            yield {"settings": settings, "node": node, "server": server}


@pytest.fixture(scope="module")
def gateway(stack: dict[str, Any]) -> Iterator[str]:
    settings = GatewaySettings(
        redis_url=stack["settings"].redis_url, prefix=stack["settings"].prefix, gateway_tokens=TOKEN
    )
    with serve_in_thread(create_app(settings), lifespan=True) as url:
        yield url


def sim_script(*steps: str) -> dict[str, Any]:
    return {"script": list(steps), "key": uuid.uuid4().hex}


def run_mix(client: Client, gateway: str, tmp_path: Path) -> None:
    """Successes, retries, failures, cancels, idempotent submits, a dead-letter re-run, gateway and batch."""
    ok = client.submit_many([SHORT] * 8) + [client.submit(SHORT, priority=p) for p in (0, 9)]
    retried = [client.submit({**SHORT, "sim": sim_script(kind, "ok")}) for kind in ("overload", "drop:3", "rate_limit")]
    quota = client.submit({**SHORT, "sim": sim_script("quota", "ok")})  # final at once: a dead letter
    exhausted = client.submit({**SHORT, "sim": sim_script("server_error")})  # fails after 3 attempts
    first = client.submit(SHORT, idempotency_key="order-1")
    assert client.submit(SHORT, idempotency_key="order-1").id == first.id
    with pytest.raises(InvalidRequest):
        client.submit({**SHORT, "max_tokens": 9}, idempotency_key="order-1")
    early = client.submit(SHORT)
    early.cancel()  # most likely still queued: ended by the producer, skipped by the node
    running = client.submit({**SHORT, "sim": {"fault": "stall:5"}})
    while running.status() == "queued":
        time.sleep(0.02)
    running.cancel()  # aborted mid-stream by the node
    for job in [*ok, *retried, first]:
        assert job.result(timeout=30).choices[0].message.content
    for job in (quota, exhausted):
        with pytest.raises(JobFailed):
            job.result(timeout=30)
    for job in (early, running):
        with pytest.raises(JobCancelled):
            job.result(timeout=30)
    assert client.retry(quota.id).result(timeout=30).choices  # the script's next answer is ok
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=gateway, headers=headers, timeout=30) as http:
        done = http.post("/v1/chat/completions", json=SHORT)
        assert done.status_code == 200, done.text
        with http.stream("POST", "/v1/chat/completions", json={**SHORT, "stream": True}) as stream:
            assert stream.status_code == 200 and "[DONE]" in stream.read().decode()
        job_id = http.post("/v1/jobs", json=SHORT, headers={"Idempotency-Key": "gw-1"}).json()["id"]
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as sse:
            assert "event: completed" in sse.read().decode()
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": SHORT} for i in range(3)]
    src.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    run_batch(client, src, dst, poll_s=0.05)
    assert len(dst.read_text().splitlines()) == 4


def seqs(events: Any) -> list[int]:
    return [e.seq for e in events]


def sse(gateway: str, job_id: str, last_event_id: str) -> list[tuple[int, str]]:
    """(id, event) of each SSE message of the job's event stream, resumed after ``last_event_id``."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Last-Event-ID": last_event_id}
    with httpx.stream("GET", f"{gateway}/v1/jobs/{job_id}/events", headers=headers, timeout=30) as response:
        text = response.read().decode()
    blocks = [dict(line.split(": ", 1) for line in block.splitlines()) for block in text.split("\n\n") if block]
    return [(int(b["id"]), b["event"]) for b in blocks]


def kill_pubsub(r: redis.Redis, name: str) -> int:
    """Drop the pub/sub connections of clients named ``name`` (a network blip, for one follower only)."""
    victims = [c["id"] for c in r.client_list(_type="pubsub") if c.get("name") == name]
    for client_id in victims:
        r.client_kill_filter(_id=client_id)
    return len(victims)


def test_log_is_capped_and_late_followers_get_its_tail(stack: dict[str, Any], gateway: str) -> None:
    settings = stack["settings"]
    with Client(settings=settings) as client:
        job = client.submit(LONG)
        result = job.result(timeout=30)
        last = int(job.record()["seq"])
        assert last > 3 * CAP  # a delta per token: well past the cap
        assert result.usage is not None and result.usage.completion_tokens >= ANSWER  # the answer is whole
        log = client.keys.log(job.id)
        assert client.redis.xlen(log) == CAP and client.redis.pttl(log) > 0
        kept = list(range(last - CAP + 1, last + 1))
        replay = list(job.events())
        assert seqs(replay) == kept and replay[-1].type == "completed"
        assert seqs(job.events(after_seq=3)) == kept  # resuming inside the trimmed part: from the oldest kept
        assert seqs(job.events(after_seq=last - 5)) == kept[-5:]

    async def follow(after: int) -> list[int]:
        async with AsyncClient(settings=settings) as aclient:
            return [e.seq async for e in aclient.job(job.id).events(after_seq=after)]

    assert asyncio.run(follow(0)) == kept
    assert asyncio.run(follow(3)) == kept
    resumed = sse(gateway, job.id, "3")
    assert [i for i, _ in resumed] == kept and resumed[-1][1] == "completed"


def test_followers_joining_mid_stream_end(stack: dict[str, Any]) -> None:
    settings = stack["settings"]
    got: dict[str, list[int]] = {}
    with Client(settings=settings) as client:
        job = client.submit(LONG)
        deadline = time.monotonic() + 20
        while int(job.record()["seq"]) <= 2 * CAP:  # the oldest entries are gone by now
            assert time.monotonic() < deadline
            time.sleep(0.005)
        thread = threading.Thread(target=lambda: got.update(sync=seqs(job.events())))
        thread.start()

        async def follow() -> list[int]:
            async with AsyncClient(settings=settings) as aclient:
                return [e.seq async for e in aclient.job(job.id).events()]

        got["async"] = asyncio.run(asyncio.wait_for(follow(), 30))
        thread.join(30)
        last = int(job.record()["seq"])
    for name, seen in got.items():
        # From the oldest entry kept when it arrived, then every event live, to the terminal one.
        assert seen[0] > CAP and seen == list(range(seen[0], last + 1)), name


def test_followers_that_lose_their_connection_skip_trimmed_entries_and_end(stack: dict[str, Any]) -> None:
    settings = stack["settings"]
    name = f"follower-{uuid.uuid4().hex[:6]}"
    named = ClientSettings(
        redis_url=f"{settings.redis_url}?client_name={name}", broker_url=settings.redis_url, prefix=settings.prefix
    )
    admin = redis.Redis.from_url(settings.redis_url)

    def blip() -> None:
        assert kill_pubsub(admin, name) == 1
        # Nothing reads or reconnects meanwhile: the events published now are lost to this follower,
        # and the log has trimmed past them by the time it looks.
        time.sleep(0.4)

    async def follow_async() -> list[Any]:
        async with AsyncClient(settings=named) as aclient:
            job = await aclient.submit(LONG)
            seen: list[Any] = []
            async for event in job.events():
                seen.append(event)
                if len(seen) == 5:
                    blip()  # blocks the loop on purpose: the fan-out cannot reconnect either
            return seen

    def follow_sync() -> list[Any]:
        with Client(settings=named) as client:
            seen: list[Any] = []
            for event in client.submit(LONG).events():
                seen.append(event)
                if len(seen) == 5:
                    blip()
            return seen

    try:
        for events in (asyncio.run(asyncio.wait_for(follow_async(), 30)), follow_sync()):
            seen = seqs(events)
            jumps = [b - a for a, b in itertools.pairwise(seen)]
            assert min(jumps) >= 1 and max(jumps) > CAP // 2, seen  # went on past what was trimmed
            assert events[-1].type == "completed"
            with Client(settings=settings) as client:
                assert seen[-1] == int(client.job(events[-1].job_id).record()["seq"])
    finally:
        admin.close()


# Last in the module: it stops the node, and it audits the keys the tests above left too.
def test_every_key_expires_or_has_an_owner(stack: dict[str, Any], gateway: str, tmp_path: Path) -> None:
    settings, server = stack["settings"], stack["server"]
    with Client(settings=settings) as client:
        run_mix(client, gateway, tmp_path)

        async def follow_async() -> None:
            async with AsyncClient(settings=settings) as aclient:
                job = await aclient.submit(SHORT)
                assert [e async for e in job.events()][-1].type == "completed"

        asyncio.run(follow_async())
    r = redis.Redis.from_url(server.url)
    try:
        time.sleep(FAST["heartbeat_interval_s"] * 2)  # a node heartbeat (P:nodes) and the acks land
        families = {k.decode().removeprefix(f"{settings.prefix}:").split(":")[0] for k in r.scan_iter()}
        assert {"job", "log", "idem", "failed", "nodes"} <= families, families  # the mix wrote them all
        assert unbounded_keys(r, settings.prefix) == []
        logs = [k for k in r.scan_iter(match=f"{settings.prefix}:log:*")]
        assert logs and all(0 < r.xlen(k) <= CAP for k in logs)
        stack["node"].stop()  # what a stopped node leaves behind is bounded too
        assert unbounded_keys(r, settings.prefix) == []
    finally:
        r.close()


def test_marking_an_expired_record_does_not_bring_it_back_without_a_ttl(redis_url: str) -> None:
    """The producer's late writes (``sent``, ``cancel_requested``) only touch a record that still exists."""
    settings = ClientSettings(redis_url=redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
    with Client(settings=settings) as client:
        job = client.submit({"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "hi"}]})
        client.redis.delete(settings.keys.job(job.id))  # as if it expired just before the write
        assert client._mark(job.id, "sent", "1") is False
        assert not client.redis.exists(settings.keys.job(job.id))
