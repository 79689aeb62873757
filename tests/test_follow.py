"""The producers' sans-I/O algorithms (producers/follow.py): table tests, no Redis.

``Follower`` is fed a script of log reads, live deliveries, resyncs and quiet polls, as both
clients' shells feed it; each case checks what it hands out and what it asks for next.
``ResultWait`` and the bounded inbox are checked the same way.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import pytest

from moonq.errors import JobCancelled, JobFailed, JobNotFound, JobTimeout
from moonq.record import JobRecord
from moonq.wire import ChatCompletion, Event
from producers.follow import RESULT_POLL_S, RESYNC, Delivery, Follower, ResultWait, deliver

JOB = "job-1"


def event(seq: int, type: str = "delta") -> Event:
    return Event(job_id=JOB, seq=seq, type=type, ts=0.0)


def wire(seq: int, type: str = "delta") -> bytes:
    return event(seq, type).model_dump_json().encode()


def run(
    steps: list[tuple[Any, ...]], after_seq: int = 0, confirmation_coming: bool = False
) -> tuple[list[int], Follower]:
    """Play ``steps`` against a new follower; returns the seqs it handed out, in order.

    Steps: ("log", [seq, ...], terminal_seq|None), ("live", seq, type), ("resync",), ("quiet", job_exists).
    """
    follower = Follower(after_seq, confirmation_coming=confirmation_coming)
    out: list[int] = []
    for step in steps:
        kind = step[0]
        if kind == "log":
            _, seqs, end = step
            out += [e.seq for e in follower.take_log(event(s, "completed" if s == end else "delta") for s in seqs)]
        elif kind == "live":
            out += [e.seq for e in follower.take_live(wire(step[1], step[2]))]
        elif kind == "resync":
            out += [e.seq for e in follower.take_live(RESYNC)]
        else:
            follower.quiet(job_exists=step[1])
    return out, follower


CASES: dict[str, tuple[list[tuple[Any, ...]], int, list[int], bool, bool]] = {
    # name: (steps, after_seq, handed out, needs_log after, done after)
    "starts by reading the log": ([], 0, [], True, False),
    "empty log, then in order live": (
        [("log", [], None), ("live", 1, "started"), ("live", 2, "delta"), ("live", 3, "completed")],
        0,
        [1, 2, 3],
        False,
        True,
    ),
    "log, then live that overlaps it (duplicates dropped)": (
        [("log", [1, 2], None), ("live", 1, "delta"), ("live", 2, "delta"), ("live", 3, "delta")],
        0,
        [1, 2, 3],
        False,
        False,
    ),
    "a live duplicate is dropped": (
        [("log", [], None), ("live", 1, "delta"), ("live", 1, "delta"), ("live", 2, "delta")],
        0,
        [1, 2],
        False,
        False,
    ),
    "a gap asks for the log, which fills it": (
        [("log", [], None), ("live", 1, "delta"), ("live", 3, "delta"), ("log", [2, 3, 4], None)],
        0,
        [1, 2, 3, 4],
        False,
        False,
    ),
    "a gap asks for the log": ([("log", [], None), ("live", 2, "delta")], 0, [], True, False),
    "a trimmed log: goes on from the oldest entry kept": (
        [("log", [], None), ("live", 1, "delta"), ("live", 9, "delta"), ("log", [7, 8, 9, 10], None)],
        0,
        [1, 7, 8, 9, 10],
        False,
        False,
    ),
    "a late reader of a trimmed log gets its tail": ([("log", [41, 42, 43], 43)], 0, [41, 42, 43], False, True),
    "after_seq skips what the reader has": ([("log", [1, 2, 3, 4], None)], 2, [3, 4], False, False),
    "terminal in the log ends it; later deliveries are ignored": (
        [("log", [1, 2, 3], 3), ("live", 4, "delta"), ("resync",)],
        0,
        [1, 2, 3],
        False,
        True,
    ),
    "terminal live ends it": ([("log", [1], None), ("live", 2, "failed")], 0, [1, 2], False, True),
    "a terminal event that follows a gap waits for the log": (
        [("log", [], None), ("live", 1, "delta"), ("live", 3, "cancelled")],
        0,
        [1],
        True,
        False,
    ),
    "a resync asks for the log (confirmation, reconnect)": (
        [("log", [1], None), ("resync",), ("log", [1, 2], None), ("live", 3, "delta")],
        0,
        [1, 2, 3],
        False,
        False,
    ),
    "a quiet poll asks for the log while the job exists": (
        [("log", [1], None), ("quiet", True)],
        0,
        [1],
        True,
        False,
    ),
    "a quiet poll that finds the job gone ends it": ([("log", [1], None), ("quiet", False)], 0, [1], False, True),
    "a lost terminal message is found by the quiet poll's log read": (
        [("log", [1], None), ("quiet", True), ("log", [1, 2], 2)],
        0,
        [1, 2],
        False,
        True,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_follower(name: str) -> None:
    steps, after_seq, handed_out, needs_log, done = CASES[name]
    out, follower = run(steps, after_seq)
    assert out == handed_out
    assert (follower.needs_log, follower.done) == (needs_log, done)


# A follower whose own subscription's confirmation is coming: (steps, handed out, needs_log after, done after).
CONFIRMING: dict[str, tuple[list[tuple[Any, ...]], list[int], bool, bool]] = {
    "waits for its confirmation before reading the log": ([], [], False, False),
    "the confirmation asks for the log": ([("resync",)], [], True, False),
    "the log read at the confirmation has what came before": (
        [("resync",), ("log", [1, 2], None)],
        [1, 2],
        False,
        False,
    ),
    "a first live event before the confirmation is handed out": ([("live", 1, "started")], [1], False, False),
    "a gap before the confirmation asks for the log": ([("live", 2, "delta")], [], True, False),
    "a quiet poll before the confirmation reads the log": ([("quiet", True), ("log", [1], None)], [1], False, False),
}


@pytest.mark.parametrize("name", list(CONFIRMING))
def test_follower_whose_confirmation_is_coming(name: str) -> None:
    steps, handed_out, needs_log, done = CONFIRMING[name]
    out, follower = run(steps, confirmation_coming=True)
    assert out == handed_out
    assert (follower.needs_log, follower.done) == (needs_log, done)


def test_log_min_is_the_entry_after_the_last_handed_out() -> None:
    follower = Follower(after_seq=5)
    assert follower.log_min == "6-0"
    follower.take_log([event(6), event(7)])
    assert follower.log_min == "8-0"


def test_every_interleaving_yields_each_event_once_in_order() -> None:
    """Whatever order log reads and (duplicated) live deliveries come in, the output is 1..N once."""
    n = 8
    for split in range(n + 1):  # the log read sees 1..split; live carries split-2..n, twice
        follower = Follower()
        logged = (event(s, "completed" if s == n else "delta") for s in range(1, split + 1))
        out = [e.seq for e in follower.take_log(logged)]
        for s in [*range(max(1, split - 2), n + 1)] * 2:
            out += [e.seq for e in follower.take_live(wire(s, "completed" if s == n else "delta"))]
        assert out == list(range(1, n + 1)), split
        assert follower.done


# --- bounded inbox ------------------------------------------------------------------------------


def test_an_inbox_past_its_limit_becomes_one_resync() -> None:
    items: deque[Delivery] = deque()
    for s in range(1, 4):
        deliver(items, wire(s), limit=3)
    assert len(items) == 3
    deliver(items, wire(4), limit=3)
    assert list(items) == [RESYNC]  # the log has all four
    deliver(items, wire(5), limit=3)
    assert list(items) == [RESYNC, wire(5)]


# --- ResultWait ---------------------------------------------------------------------------------

COMPLETION = {"id": "c1", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}


def rec(status: str, **fields: str) -> JobRecord | None:
    return JobRecord.from_redis({"status": status, **fields})


def test_result_of_an_ended_job() -> None:
    wait = ResultWait(JOB, None, start=0.0)
    done = wait.step(rec("succeeded", result=json.dumps(COMPLETION)), now=0.0)
    assert isinstance(done, ChatCompletion) and done.choices[0].message.content == "hi"
    error = {"type": "rate_limit", "message": "quota", "status": 429}
    with pytest.raises(JobFailed) as failed:
        wait.step(rec("failed", error=json.dumps(error)), now=0.0)
    assert failed.value.error == error and not isinstance(failed.value, JobCancelled)
    with pytest.raises(JobCancelled):
        wait.step(rec("cancelled"), now=0.0)
    with pytest.raises(JobNotFound):
        wait.step(None, now=0.0)


@pytest.mark.parametrize(
    ("timeout_s", "now", "expected"),
    [
        (None, 100.0, RESULT_POLL_S),  # no deadline: poll bound only
        (10.0, 0.0, RESULT_POLL_S),
        (10.0, 9.75, 0.25),  # never waits past the deadline
    ],
)
def test_result_waits_for_at_most_the_poll_or_the_deadline(
    timeout_s: float | None, now: float, expected: float
) -> None:
    for status in ("queued", "running", "retrying"):
        assert ResultWait(JOB, timeout_s, start=0.0).step(rec(status), now=now) == pytest.approx(expected)


def test_result_times_out_only_while_the_job_has_not_ended() -> None:
    wait = ResultWait(JOB, 2.0, start=0.0)
    with pytest.raises(JobTimeout, match=r"still running after 2\.0s"):
        wait.step(rec("running"), now=2.0)
    assert isinstance(wait.step(rec("succeeded", result=json.dumps(COMPLETION)), now=5.0), ChatCompletion)


@pytest.mark.parametrize(
    ("item", "wakes"),
    [
        (wire(1, "started"), False),
        (wire(2, "delta"), False),
        (wire(3, "retry"), False),
        (wire(4, "completed"), True),
        (wire(4, "failed"), True),
        (wire(4, "cancelled"), True),
        (RESYNC, True),  # a reconnect may have lost the terminal message
    ],
)
def test_what_wakes_a_result_wait(item: Delivery, wakes: bool) -> None:
    assert ResultWait.wakes(item) is wakes
