"""The job record's one owner (moonq/record.py): Lua placeholders, the typed reader, terminal states.

Table tests of the pure parts, the scripts that touch the hash checked for leftover placeholders,
``$is_terminal`` evaluated by Redis itself, and one job end to end (producer -> embedded worker
-> simulator) read back as a ``JobRecord``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from moonq.eventlog import APPEND_LUA
from moonq.record import (
    LUA_NAMES,
    TERMINAL_STATUSES,
    JobField,
    JobRecord,
    JobStatus,
    decode_hash,
    new_record,
    record_lua,
)
from producers import Client
from worker.delivery import CLAIM_LUA
from worker.keepalive import KEEPALIVE_LUA
from worker.settings import Settings

# --- record_lua ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("redis.call('HGET', KEYS[1], $status)", "redis.call('HGET', KEYS[1], 'status')"),
        ("redis.call('HSET', KEYS[1], $finished_at, ARGV[1])", "redis.call('HSET', KEYS[1], 'finished_at', ARGV[1])"),
        ("redis.call('HSET', KEYS[1], $status, $running)", "redis.call('HSET', KEYS[1], 'status', 'running')"),
        ("if status ~= $queued then", "if status ~= 'queued' then"),
        ("${cancel_requested}_x", "'cancel_requested'_x"),  # braces delimit a name followed by letters
        ("'cost: $$5'", "'cost: $5'"),  # $$ is a literal dollar
        ("return 1", "return 1"),  # nothing to replace
        (
            "if $is_terminal then return 0 end",
            "if (status == 'cancelled' or status == 'failed' or status == 'succeeded') then return 0 end",
        ),
    ],
)
def test_record_lua_puts_quoted_names_in(script: str, expected: str) -> None:
    assert record_lua(script) == expected


@pytest.mark.parametrize("name", [*JobField, *JobStatus])
def test_every_field_and_status_is_a_placeholder(name: str) -> None:
    assert record_lua(f"${name}") == f"'{name}'"


@pytest.mark.parametrize(
    "script",
    [
        "redis.call('HGET', KEYS[1], $stauts)",  # a typo
        "redis.call('HGET', KEYS[1], $finished)",  # not a field
        "return $SUCCEEDED",  # names are case-sensitive
        "return ${heartbeat}",
    ],
)
def test_an_unknown_placeholder_raises_key_error(script: str) -> None:
    with pytest.raises(KeyError):
        record_lua(script)


@pytest.mark.parametrize(
    ("name", "script"), [("APPEND", APPEND_LUA), ("CLAIM", CLAIM_LUA), ("KEEPALIVE", KEEPALIVE_LUA)]
)
def test_the_scripts_that_touch_the_hash_have_every_placeholder_filled(name: str, script: str) -> None:
    assert "$" not in script, name
    assert "'owner'" in script, name  # every one of them fences on the owner, by the record's name for it


@pytest.mark.parametrize("status", [*JobStatus, "", "done", "SUCCEEDED"])
def test_is_terminal_in_lua_agrees_with_python(r: redis.Redis, status: str) -> None:
    script = record_lua("local status = ARGV[1]\nif $is_terminal then return 1 end\nreturn 0")
    in_lua = r.eval(script, 0, status)
    assert bool(in_lua) is (status in TERMINAL_STATUSES)


def test_lua_names_cover_every_field_and_status_once() -> None:
    assert set(LUA_NAMES) == {*JobField, *JobStatus, "is_terminal"}


# --- terminal states ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        (JobStatus.QUEUED, False),
        (JobStatus.RUNNING, False),
        (JobStatus.RETRYING, False),
        (JobStatus.SUCCEEDED, True),
        (JobStatus.FAILED, True),
        (JobStatus.CANCELLED, True),
    ],
)
def test_terminal_states(status: JobStatus, terminal: bool) -> None:
    assert status.terminal is terminal
    assert (status in TERMINAL_STATUSES) is terminal
    rec = JobRecord.from_redis({"status": status.value})
    assert rec is not None and rec.terminal is terminal


@pytest.mark.parametrize("status", [None, "", "unknown"])
def test_no_status_or_another_word_is_not_terminal(status: str | None) -> None:
    assert status not in TERMINAL_STATUSES


# --- JobRecord.from_redis -----------------------------------------------------------------------

FINISHED: dict[str, str] = {
    "status": "succeeded",
    "model": "kimi-k2.5",
    "priority": "3",
    "enqueued_at": "1700000000.25",
    "sent": "1",
    "seq": "42",
    "attempt": "2",
    "owner": "abc123",
    "heartbeat_at": "1700000001000",
    "cancel_requested": "0",
    "started_at": "1700000000.5",
    "finished_at": "1700000003.75",
    "result": '{"object":"chat.completion","choices":[]}',
}


def _as_bytes(fields: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in fields.items()}


@pytest.mark.parametrize("raw", [FINISHED, _as_bytes(FINISHED)], ids=["str", "bytes"])
def test_from_redis_reads_str_and_bytes_hashes_alike(raw: dict[Any, Any]) -> None:
    rec = JobRecord.from_redis(raw)
    assert rec is not None
    assert rec.status is JobStatus.SUCCEEDED and rec.terminal
    assert (rec.model, rec.priority, rec.seq, rec.attempt, rec.owner) == ("kimi-k2.5", 3, 42, 2, "abc123")
    assert (rec.enqueued_at, rec.started_at, rec.finished_at) == (1700000000.25, 1700000000.5, 1700000003.75)
    assert rec.heartbeat_at == 1700000001000
    assert rec.sent is True and rec.cancel_requested is False
    assert rec.result_data() == {"object": "chat.completion", "choices": []}
    assert rec.error is None and rec.error_info() == {}
    assert rec.retry_of is None and rec.envelope is None


@pytest.mark.parametrize(
    "extra",
    [
        {"added_by_a_newer_writer": "x"},
        {b"cost_usd": b"0.5", b"region": b"eu"},
        {"Status": "failed"},  # field names are case-sensitive: not ours, ignored
    ],
)
def test_from_redis_ignores_fields_it_does_not_know(extra: dict[Any, Any]) -> None:
    rec = JobRecord.from_redis({**_as_bytes(FINISHED), **extra})
    assert rec == JobRecord.from_redis(FINISHED)


@pytest.mark.parametrize(
    "raw",
    [None, {}, {"model": "m", "seq": "3"}, {b"owner": b"x"}, {"status": ""}],
    ids=["none", "empty", "no-status", "no-status-bytes", "empty-status"],
)
def test_from_redis_is_none_without_a_record(raw: dict[Any, Any] | None) -> None:
    assert JobRecord.from_redis(raw) is None


@pytest.mark.parametrize(
    ("fields", "attr", "value"),
    [
        ({"owner": ""}, "owner", ""),  # a requeued job's cleared owner
        ({"finished_at": ""}, "finished_at", None),  # empty means missing
        ({}, "attempt", 0),
        ({}, "seq", 0),
        ({}, "sent", False),
        ({"cancel_requested": "1"}, "cancel_requested", True),
        ({"retry_of": "job-1"}, "retry_of", "job-1"),
    ],
)
def test_from_redis_defaults_and_empty_values(fields: dict[str, str], attr: str, value: object) -> None:
    rec = JobRecord.from_redis({"status": "running", **fields})
    assert rec is not None and getattr(rec, attr) == value


def test_a_failed_record_parses_its_error() -> None:
    error = {"type": "rate_limit_reached_error", "message": "slow down", "status": 429}
    rec = JobRecord.from_redis({"status": "failed", "error": json.dumps(error)})
    assert rec is not None and rec.terminal and rec.error_info() == error and rec.result_data() is None


def test_new_record_reads_back_as_a_queued_job() -> None:
    fields = new_record(model="moonshot-v1-8k", enqueued_at=1700000000.125, priority=0, envelope_json="{}")
    rec = JobRecord.from_redis(_as_bytes(fields))
    assert rec is not None
    assert (rec.status, rec.model, rec.priority, rec.seq, rec.enqueued_at) == (
        JobStatus.QUEUED,
        "moonshot-v1-8k",
        0,
        0,
        1700000000.125,
    )
    assert not rec.terminal and rec.attempt == 0 and rec.envelope == "{}"


@pytest.mark.parametrize("raw", [None, {}, FINISHED, _as_bytes(FINISHED)])
def test_decode_hash(raw: dict[Any, Any] | None) -> None:
    assert decode_hash(raw) == ({} if not raw else FINISHED)


# --- a real job, end to end ---------------------------------------------------------------------


def test_a_job_run_by_the_worker_reads_back_as_a_succeeded_record(
    redis_url: str, settings: Settings, client: Client, worker: Any
) -> None:
    job = client.submit({"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Hi"}]}, priority=2)
    completion = job.result(timeout=20)
    with redis.Redis.from_url(redis_url) as r:
        raw = r.hgetall(settings.keys.job(job.id))
    rec = JobRecord.from_redis(raw)
    assert rec is not None
    assert rec.status is JobStatus.SUCCEEDED and rec.terminal
    assert rec.model == "moonshot-v1-8k" and rec.priority == 2 and rec.attempt == 1
    assert rec.owner and rec.seq >= 2  # at least one delta and the completed event
    assert rec.enqueued_at is not None and rec.started_at is not None and rec.finished_at is not None
    assert rec.started_at >= rec.enqueued_at - 1 and rec.finished_at >= rec.started_at - 1  # clocks: Redis vs us
    result = rec.result_data()
    assert result is not None and result["id"] == completion.id and result["object"] == "chat.completion"
    assert rec.error is None and not rec.cancel_requested
    # The same record through the SDK's dict reader (a last heartbeat may still land after the end).
    again = JobRecord.from_redis(job.record())
    assert again is not None and again.model_copy(update={"heartbeat_at": rec.heartbeat_at}) == rec
