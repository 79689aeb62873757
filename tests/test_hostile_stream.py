"""Hostile but well-formed upstream data costs one job at most, never the jobs streaming beside it.

A real node (the embedded runtime: no broker, so a delivery that raises shows at once instead of
after redeliveries) streams from the simulator, whose faults send what a broken upstream can: a
lone UTF-16 surrogate as a JSON escape (valid JSON, not valid Unicode: it cannot be encoded for
Redis), usage counts that are not counts, and a 502 page that goes on for megabytes. The job with
the bad data ends in its one delivery with no more retries than the fault calls for; the jobs
beside it, sharing the node's pipelines, see nothing at all.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from moonq.eventlog import APPEND_LUA, append_args, delta_body
from moonq.keys import Keys
from moonq.wire import Event
from producers import Client, Job, JobFailed
from simulator import SimConfig, SimServer
from simulator.faults import BAD_USAGE_VALUES
from tests.helpers import make_settings, streaming, wait_until
from worker.limiter_state import LimiterKeys
from worker.loop import Runtime
from worker.settings import Settings
from worker.sink import ScriptSink
from worker.surrogates import replace_lone_surrogates
from worker.usage import token_counts, usage_problem

USER = [{"role": "user", "content": "Tell me something long about rivers."}]
# About 1 s per answer (100 one-token chunks, 10 ms apart): neighbours still stream when the bad chunk comes.
PACED = SimConfig(seed=8, chunk_interval_s=0.01, tokens_per_chunk=1, answer_tokens=(100, 100))
TPM = 10_000_000


@pytest.fixture(scope="module")
def paced_sim() -> Iterator[SimServer]:
    with SimServer(PACED) as server:
        yield server


@pytest.fixture(scope="module")
def node(redis_url: str, paced_sim: SimServer) -> Iterator[tuple[Runtime, Settings]]:
    settings = make_settings(
        redis_url, prefix=f"hs{uuid.uuid4().hex[:8]}", moonshot_base_url=paced_sim.base_url, max_attempts=3, tpm=TPM
    )
    rt = Runtime(settings).start()
    yield rt, settings
    rt.stop()


def scripted(*script: str) -> dict[str, Any]:
    # A small completion budget keeps each TPM reservation small; the answers are 100 tokens.
    sim = {"script": list(script), "key": uuid.uuid4().hex}
    return {"model": "moonshot-v1-8k", "messages": USER, "max_completion_tokens": 200, "sim": sim}


def start(client: Client, rt: Runtime, request: dict[str, Any]) -> tuple[Job, Future[Any]]:
    """Submit a job and run its one delivery on the node."""
    job = client.submit(request)
    return job, rt.submit(json.loads(job.record()["envelope"]))


def retries(events: list[Event]) -> list[tuple[int | None, str | None]]:
    return [(e.attempt, e.reason) for e in events if e.type == "retry"]


def untouched(job: Job, run: Future[Any]) -> None:
    """The job succeeded in its first attempt of its one delivery: no retry, no takeover."""
    assert run.result(timeout=30) == "succeeded"
    events = list(job.events())
    assert retries(events) == [] and events[-1].type == "completed"
    assert job.record()["attempt"] == "1"


# --- (a)+(b) a lone surrogate --------------------------------------------------------------------


def test_a_lone_surrogate_becomes_u_fffd_and_no_neighbour_notices(node: tuple[Runtime, Settings]) -> None:
    rt, settings = node
    with Client(settings=settings) as client:
        neighbours = [start(client, rt, scripted("ok")) for _ in range(12)]
        wait_until(lambda: streaming(client, [job.id for job, _ in neighbours]), 10, "the neighbours to stream")
        bad, bad_run = start(client, rt, scripted("surrogate:3"))
        untouched(bad, bad_run)
        content = bad.result(timeout=5).choices[0].message.content or ""
        assert content.count("\ufffd") == 1 and "\ud800" not in content
        relayed = "".join((e.delta or {}).get("content") or "" for e in bad.events() if e.type == "delta")
        assert relayed == content
        for job, run in neighbours:
            untouched(job, run)


def test_one_call_that_cannot_be_encoded_fails_alone_in_its_pipeline(redis_url: str) -> None:
    # Below the upstream's scrubbing: whatever else could put a lone surrogate in an event fails only
    # its own call, although every call of the batch went to the same pipeline.
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")

    async def main() -> tuple[list[Any], int]:
        client = Redis.from_url(redis_url)
        try:
            sink = ScriptSink(client, APPEND_LUA)
            jobs = [f"j{i}" for i in range(20)]
            for job in jobs:
                await client.hset(keys.job(job), mapping={"status": "running", "seq": 0})
            calls = [
                append_args(
                    keys, job, [delta_body(job, 1, 0, {"content": "\ud800" if job == "j7" else "fine"})], ttl_s=60
                )
                for job in jobs
            ]
            results = await asyncio.gather(*(sink(*call) for call in calls), return_exceptions=True)
            return results, sink.pipelines
        finally:
            await client.aclose()

    results, pipelines = asyncio.run(main())
    assert isinstance(results[7], UnicodeEncodeError)
    assert results[:7] + results[8:] == [1] * 19
    assert pipelines == 1  # one batch: the failure was isolated inside it


@pytest.mark.parametrize(
    ("decoded", "expected"),
    [
        ("a\ud800b", "a\ufffdb"),
        (
            {"x\udfff": ["\udc00", {"k": "\ud83d"}], "ok": "\U0001f600"},
            {"x\ufffd": ["\ufffd", {"k": "\ufffd"}], "ok": "\U0001f600"},
        ),
        ([1, None, 2.5, True, "plain"], [1, None, 2.5, True, "plain"]),
    ],
)
def test_lone_surrogates_are_replaced_in_keys_and_values(decoded: Any, expected: Any) -> None:
    assert replace_lone_surrogates(decoded) == expected


# --- (c) usage that is not a count ---------------------------------------------------------------


@pytest.mark.parametrize("variant", range(len(BAD_USAGE_VALUES)), ids=BAD_USAGE_VALUES)
def test_a_bad_usage_is_dropped_in_one_attempt(node: tuple[Runtime, Settings], r: redis.Redis, variant: int) -> None:
    rt, settings = node
    with Client(settings=settings) as client:
        job, run = start(client, rt, scripted(f"bad_usage:{variant}"))
        untouched(job, run)
        result = job.result(timeout=5)  # readable: no count a reader cannot parse
        assert result.usage is None and result.choices[0].message.content
        assert "usage" not in json.loads(job.record()["result"])
    # Unknown usage refunds nothing; a count taken at its word (1e29 tokens) would have filled the fleet's
    # TPM window far beyond its limit.
    tokens = r.hget(LimiterKeys.for_prefix(settings.prefix).tpm.units, "sum")
    assert tokens is not None and int(tokens) <= TPM


@pytest.mark.parametrize(
    "usage",
    [
        {"total_tokens": "12 tokens"},
        {"prompt_tokens": -1},
        {"completion_tokens": None, "total_tokens": float("nan")},
        {"total_tokens": float("inf")},
        {"total_tokens": 10**30},
        {"total_tokens": 2.5},
        {"total_tokens": True},
        {"prompt_tokens_details": {"cached_tokens": "3"}},
        {"completion_tokens_details": []},
        "12",
    ],
)
def test_usage_problem_names_what_cannot_be_counted(usage: Any) -> None:
    assert usage_problem(usage)


def test_good_usage_has_no_problem_and_token_counts_never_raise() -> None:
    good = {"prompt_tokens": 10, "completion_tokens": 5.0, "total_tokens": 15, "prompt_tokens_details": None}
    assert usage_problem(good) is None
    assert usage_problem({"prompt_tokens": 3, "new_field": "anything"}) is None
    assert token_counts({"prompt_tokens": "12 tokens", "completion_tokens": float("inf"), "cached_tokens": -3}) == {
        "prompt": 0,
        "completion": 0,
        "cached": 0,
        "reasoning": 0,
    }


# --- (d) a huge error body -----------------------------------------------------------------------


def test_a_huge_error_body_is_read_only_up_to_its_cap(node: tuple[Runtime, Settings]) -> None:
    # Each page is 64 MiB at 8 MiB/s: reading one whole would take 8 s, three of them 24.
    rt, settings = node
    with Client(settings=settings) as client:
        started = time.monotonic()
        job, run = start(client, rt, scripted("huge_error"))
        assert run.result(timeout=60) == "failed"
        elapsed = time.monotonic() - started
        events = list(job.events())
        assert retries(events) == [(2, "upstream_error"), (3, "upstream_error")]
        with pytest.raises(JobFailed) as info:
            job.result(timeout=1)
        error = info.value.error
        assert error["status"] == 502 and error["message"].startswith("502 Bad Gateway: the upstream sent")
        assert len(error["message"]) <= 500
        assert elapsed < 5.0, f"{elapsed:.1f}s: the error pages were read to the end"
