"""ScriptSink: every job's log appends share pipelines, survive a script flush, and fail one by one."""

from __future__ import annotations

import asyncio
import uuid

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, ResponseError

from moonq.eventlog import APPEND_LUA, append_args, event_body
from moonq.keys import Keys
from worker.sink import ScriptSink


def _args(keys: Keys, job_id: str, n: int) -> tuple[list[str], list[str | int]]:
    return append_args(
        keys, job_id, [event_body(job_id, "delta", delta={"content": str(i)}) for i in range(n)], ttl_s=60
    )


def test_concurrent_appends_share_pipelines_and_survive_a_script_flush(redis_url: str) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")

    async def main() -> tuple[list[int], int, int, list[int]]:
        redis = Redis.from_url(redis_url)
        try:
            sink = ScriptSink(redis, APPEND_LUA)
            jobs = [f"j{i}" for i in range(200)]
            for job in jobs:  # the script only writes to an existing record
                await redis.hset(keys.job(job), mapping={"status": "running", "seq": 0})
            seqs = await asyncio.gather(*(sink(*_args(keys, job, 3)) for job in jobs))
            pipelines, calls = sink.pipelines, sink.calls
            await redis.script_flush()  # as after a Redis restart without persistence
            again = await asyncio.gather(*(sink(*_args(keys, job, 1)) for job in jobs[:5]))
            return seqs, pipelines, calls, again
        finally:
            await redis.aclose()

    seqs, pipelines, calls, again = asyncio.run(main())
    assert seqs == [3] * 200 and calls == 200
    assert pipelines < 20, f"{pipelines} pipelines for 200 concurrent calls"
    assert again == [4] * 5


def test_a_failing_call_fails_only_its_caller(redis_url: str) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")

    async def main() -> list[object]:
        redis = Redis.from_url(redis_url)
        try:
            sink = ScriptSink(redis, APPEND_LUA)
            await redis.hset(keys.job("good"), mapping={"status": "running", "seq": 0})
            await redis.set(keys.job("bad"), "not a hash")  # HGET on it raises inside the script
            results: list[object] = await asyncio.gather(
                sink(*_args(keys, "good", 2)), sink(*_args(keys, "bad", 2)), return_exceptions=True
            )
            return results
        finally:
            await redis.aclose()

    good, bad = asyncio.run(main())
    assert good == 2
    assert isinstance(bad, ResponseError) and "WRONGTYPE" in str(bad)


# A call that holds Redis for a while (a busy loop), so a round trip is surely in flight when the link is cut.
SLOW_ECHO = "local i = 0 while i < tonumber(ARGV[2]) do i = i + 1 end return ARGV[1]"


def test_when_retries_run_out_the_callers_in_flight_hear_it_and_the_next_call_gets_its_own_reply(
    redis_url: str,
) -> None:
    async def main() -> tuple[object, list[object]]:
        redis = Redis.from_url(redis_url, retry=Retry(NoBackoff(), 0), retry_on_error=[ConnectionError])
        try:
            sink = ScriptSink(redis, SLOW_ECHO)
            assert await sink([], ["warm", 0]) == b"warm"  # the sink holds its connection from here on
            slow = asyncio.ensure_future(sink([], ["lost", 3_000_000]))
            await asyncio.sleep(0.01)  # written; Redis is still in the loop
            sink._conn._writer.transport.abort()  # the link cut under the round trip
            lost = await asyncio.gather(slow, return_exceptions=True)
            # A fresh connection: the cut one's reply ("lost") can never be read as these calls'.
            after = await asyncio.gather(*(sink([], [f"after{i}", 0]) for i in range(3)))
            return lost[0], after
        finally:
            await redis.aclose()

    lost, after = asyncio.run(main())
    assert isinstance(lost, ConnectionError), lost
    assert after == [b"after0", b"after1", b"after2"]
