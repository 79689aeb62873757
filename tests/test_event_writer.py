"""EventWriter through the shared ScriptSink: order, batching, fencing and a stopped sink, on a real Redis.

A writer queues its deltas and the sink takes them as it builds each round trip (no task or future
per delta), so these check what that must not lose: every job's log in emit order with no gap, the
terminal write after the last delta, a fenced writer failing alone, and no drain left waiting when
the sink is cancelled mid-flight.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from redis.asyncio import BlockingConnectionPool, Redis

from moonq.connect import resilient_redis
from moonq.eventlog import APPEND_LUA
from moonq.keys import Keys
from worker.publisher import EventWriter, Fenced
from worker.sink import EAGER_CALLS, ScriptSink


async def _writers(redis: Redis, keys: Keys, sink: ScriptSink, n: int) -> list[EventWriter]:
    writers = []
    for i in range(n):
        job_id = f"{uuid.uuid4().hex[:-1]}{i % 16:x}"
        await redis.hset(keys.job(job_id), mapping={"status": "running", "seq": 0, "owner": f"o{i}"})
        writers.append(EventWriter(sink, keys, job_id, owner=f"o{i}", ttl_s=60, seq=0))
    return writers


async def _log(redis: Redis, keys: Keys, job_id: str) -> list[dict[str, object]]:
    entries = await redis.xrange(keys.log(job_id))
    return [json.loads(fields[b"e"]) for _, fields in entries or [] if fields]


def test_many_writers_keep_their_order_and_share_round_trips(redis_url: str) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")

    async def main() -> None:
        redis = Redis.from_url(redis_url)
        try:
            sink = ScriptSink(redis, APPEND_LUA)
            writers = await _writers(redis, keys, sink, 40)

            async def stream(writer: EventWriter) -> None:
                for i in range(60):
                    writer.emit_delta(1, 0, {"content": f"{i} "})
                    if i % 7 == 0:
                        await asyncio.sleep(0)  # a read's worth of time: others emit meanwhile
                await writer.write("succeeded", {"status": "succeeded"})

            await asyncio.gather(*(stream(w) for w in writers))
            assert sink.pipelines < sink.calls / 4, f"{sink.pipelines} round trips for {sink.calls} appends"
            for writer in writers:
                log = await _log(redis, keys, writer.job_id)
                assert [e["seq"] for e in log] == list(range(1, 62))
                assert [e["delta"]["content"] for e in log[:-1]] == [f"{i} " for i in range(60)]  # type: ignore[index]
                assert log[-1]["type"] == "succeeded" and writer.seq == 61
                assert await redis.hget(keys.job(writer.job_id), "status") == b"succeeded"
        finally:
            await redis.aclose()

    asyncio.run(main())


def test_a_fenced_writer_fails_alone(redis_url: str) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")

    async def main() -> None:
        redis = Redis.from_url(redis_url)
        try:
            sink = ScriptSink(redis, APPEND_LUA)
            ours, taken = await _writers(redis, keys, sink, 2)
            ours.emit_delta(1, 0, {"content": "a"})
            taken.emit_delta(1, 0, {"content": "a"})
            await asyncio.gather(ours.drain(), taken.drain())
            await redis.hset(keys.job(taken.job_id), "owner", "another attempt")  # as a takeover does
            ours.emit_delta(1, 0, {"content": "b"})
            taken.emit_delta(1, 0, {"content": "b"})
            await ours.drain()
            with pytest.raises(Fenced):
                await taken.drain()
            with pytest.raises(Fenced):  # and every later emit, in the job's own task
                taken.emit_delta(1, 0, {"content": "c"})
            assert [e["delta"]["content"] for e in await _log(redis, keys, ours.job_id)] == ["a", "b"]  # type: ignore[index]
            assert [e["delta"]["content"] for e in await _log(redis, keys, taken.job_id)] == ["a"]  # type: ignore[index]
        finally:
            await redis.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("when", ["before its first step", "waiting for a connection"])
def test_a_cancelled_sink_leaves_no_drain_waiting(redis_url: str, when: str) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")

    async def main() -> None:
        # One connection, as the node's pool when all are in use: a second user waits for it.
        redis = Redis(connection_pool=BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=None))
        try:
            sink = ScriptSink(redis, APPEND_LUA)
            writers = await _writers(redis, keys, sink, 20)
            held = None
            if when == "waiting for a connection":
                held = await redis.connection_pool.get_connection()
            for writer in writers:
                writer.emit_delta(1, 0, {"content": "x"})
            if held is not None:
                await asyncio.sleep(0.05)  # the sink's round trip waits for the pool
            assert sink._flusher is not None
            sink._flusher.cancel()  # as the node's loop closing does
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(w.drain() for w in writers), return_exceptions=True), timeout=5
            )
            assert all(isinstance(o, RuntimeError) and "event sink stopped" in str(o) for o in outcomes), outcomes
            with pytest.raises(RuntimeError, match="event sink stopped"):
                writers[0].emit_delta(1, 0, {"content": "z"})
            if held is not None:
                await redis.connection_pool.release(held)
        finally:
            await redis.aclose(close_connection_pool=True)  # a pool passed in is not closed otherwise

    asyncio.run(main())


def test_deltas_trim_the_log_only_past_its_cap_and_the_terminal_write_still_ends_the_job(redis_url: str) -> None:
    """A delta's append reads the record once and writes no field: the log is trimmed once it holds more than
    ``max_events`` (exactly, the newest kept), and only a write that sets fields can end the job."""
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")

    async def main() -> None:
        redis = Redis.from_url(redis_url)
        try:
            sink = ScriptSink(redis, APPEND_LUA)
            (writer,) = await _writers(redis, keys, sink, 1)
            job_id = writer.job_id
            writer = EventWriter(sink, keys, job_id, owner="o0", ttl_s=60, seq=0, max_events=5)
            await redis.zadd(keys.active_for(job_id), {job_id: 1})
            for i in range(3):
                writer.emit_delta(1, 0, {"content": str(i)})
            await writer.drain()
            assert [e["seq"] for e in await _log(redis, keys, job_id)] == [1, 2, 3]
            for i in range(3, 7):
                writer.emit_delta(1, 0, {"content": str(i)})
                await writer.drain()  # one append per delta: each past the cap trims
            assert [e["seq"] for e in await _log(redis, keys, job_id)] == [3, 4, 5, 6, 7]
            # Deltas alone leave the job running, its keys without a TTL, in the active index.
            assert await redis.hget(keys.job(job_id), "status") == b"running"
            assert await redis.ttl(keys.job(job_id)) == -1 and await redis.ttl(keys.log(job_id)) == -1
            assert await redis.zscore(keys.active_for(job_id), job_id) is not None
            await writer.write("succeeded", {"status": "succeeded"})
            assert [e["seq"] for e in await _log(redis, keys, job_id)] == [4, 5, 6, 7, 8]
            assert 0 < await redis.ttl(keys.job(job_id)) <= 60 and 0 < await redis.ttl(keys.log(job_id)) <= 60
            assert await redis.zscore(keys.active_for(job_id), job_id) is None
            with pytest.raises(Fenced):  # ended: nothing more is written
                await writer.write("delta", {})
        finally:
            await redis.aclose()

    asyncio.run(main())


def test_an_end_written_unless_cancelled_is_refused_once_a_cancel_was_asked_for(redis_url: str) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")

    async def main() -> None:
        redis = Redis.from_url(redis_url)
        try:
            sink = ScriptSink(redis, APPEND_LUA)
            kept, asked = await _writers(redis, keys, sink, 2)
            await redis.hset(keys.job(asked.job_id), "cancel_requested", "1")
            for writer in (kept, asked):
                writer.emit_delta(1, 0, {"content": "a"})
            await kept.write("completed", {"status": "succeeded"}, unless_cancelled=True)
            with pytest.raises(Fenced):
                await asked.write("completed", {"status": "succeeded"}, unless_cancelled=True)
            assert [e["type"] for e in await _log(redis, keys, asked.job_id)] == ["delta"]  # its deltas, no end
            await asked.write("cancelled", {"status": "cancelled"})  # what the job ends with instead
            assert [e["type"] for e in await _log(redis, keys, asked.job_id)] == ["delta", "cancelled"]
            assert await redis.hget(keys.job(kept.job_id), "status") == b"succeeded"
        finally:
            await redis.aclose()

    asyncio.run(main())


def test_a_burst_goes_out_as_the_node_makes_it_before_the_loop_turns(redis_url: str) -> None:
    """Fragments that arrive in step are written in pieces of EAGER_CALLS as they are emitted, not as one
    round trip on the loop's next turn (a burst's first fragment would wait for all of it)."""
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")

    async def main() -> None:
        redis = Redis.from_url(redis_url)
        try:
            sink = ScriptSink(redis, APPEND_LUA)
            writers = await _writers(redis, keys, sink, 4 * EAGER_CALLS)
            writers[0].emit_delta(1, 0, {"content": "warm"})  # the sink connects on its first round trip
            await writers[0].drain()
            before = sink.pipelines
            for writer in writers:  # one loop turn: no await between the emits
                writer.emit_delta(1, 0, {"content": "x"})
            assert sink.pipelines - before == 4, "each EAGER_CALLS emits must go out at once"
            await asyncio.gather(*(w.drain() for w in writers))
            for i, writer in enumerate(writers):
                log = await _log(redis, keys, writer.job_id)
                assert [e["delta"]["content"] for e in log] == (["warm", "x"] if i == 0 else ["x"])  # type: ignore[index]
        finally:
            await redis.aclose()

    asyncio.run(main())


def test_round_trips_in_flight_when_the_connection_dies_are_written_again_once(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The sink's own connection killed (CLIENT KILL) with round trips written and unanswered: it reconnects
    and writes them again; every delta is in its job's log once, in order, nothing lost or doubled."""
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")

    async def main() -> None:
        redis = resilient_redis(redis_url, max_connections=8)  # the node's client: its retries
        admin = Redis.from_url(redis_url)
        try:
            sink = ScriptSink(redis, APPEND_LUA)
            writers = await _writers(redis, keys, sink, 64)
            kills = 0

            async def stream(writer: EventWriter) -> None:
                for i in range(40):
                    writer.emit_delta(1, 0, {"content": f"{i} "})
                    await asyncio.sleep(0.002)
                await writer.write("succeeded", {"status": "succeeded"})

            async def killer() -> None:  # only the sink's connection: the session's node shares this Redis
                nonlocal kills
                for _ in range(5):
                    await asyncio.sleep(0.005)
                    conn = sink._conn
                    if conn is not None and conn.is_connected:
                        host, port = conn._writer.get_extra_info("sockname")[:2]
                        kills += await admin.client_kill_filter(addr=f"{host}:{port}")

            await asyncio.gather(killer(), *(stream(w) for w in writers))
            assert kills >= 1
            replayed = [r.message for r in caplog.records if "script_sink_reconnect" in r.message]
            assert replayed and not all("in_flight=0" in m for m in replayed), replayed
            for writer in writers:
                log = await _log(redis, keys, writer.job_id)
                assert [e["seq"] for e in log] == list(range(1, 42))
                assert [e["delta"]["content"] for e in log[:-1]] == [f"{i} " for i in range(40)]  # type: ignore[index]
                assert log[-1]["type"] == "succeeded"
        finally:
            await redis.aclose()
            await admin.aclose()

    asyncio.run(main())
