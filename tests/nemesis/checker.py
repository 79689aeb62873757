"""The checker: every promise moonq makes, tested against the whole history of a run.

Input: the ``History`` (submits, cancels with the moment each returned, faults, every event each
follower received, every raw pub/sub message) and the ``Final`` state read once the run settled
(every job record and replay log in Redis, the upstream calls the tap tied to jobs, the
simulator's books, the key census, what the broker still holds, nodes that died on their own).

Output: a list of ``Violation`` (invariant, job id or "-", evidence as plain data), never a bare
assert, so a failing run says which promise broke, for which job, and why we think so.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from moonq.wire import Event
from tests.nemesis.cluster import SIM_LIMIT_SLACK, VISIBILITY_TIMEOUT_S
from tests.nemesis.history import Fault, History, Received
from tests.nemesis.tap import UpstreamCall

INVARIANTS: dict[str, str] = {
    "job_ends": "every submitted job has a record, and it ended (completed, failed or cancelled)",
    "one_terminal": "exactly one terminal event per job, the last one, and the record's status agrees",
    "seq_contiguous": "the replay log holds seqs 1..N, N the record's seq; each follower saw 1..n in order",
    "followers_agree": "each follower ended on the terminal event with the log's events; no two copies of a seq differ",
    "result_text": "a completed job's content is its content deltas since the last retry that started over",
    "cancel_no_call": "no upstream call of a job started after its cancel() returned True",
    "cancel_honoured": "a job whose cancel() returned True ends cancelled, unless it had already ended by then",
    "upstream_calls": "upstream calls per job <= 1 + the retry events it published",
    "idempotency": "every submit with one idempotency key returned the same job",
    "no_orphans": "no job record that no returned submit names is left unended",
    "bounded_keys": "once jobs ended, every Redis key has a TTL or a known owner (tests/test_bounded.py)",
    "broker_drained": "once every job ended, no message is left queued or unacknowledged",
    "inflight_limit": "the upstream never held more concurrent calls than the fleet's MOONQ_MAX_INFLIGHT",
    "nodes_stay_up": "no node process exited unless the nemesis stopped it",
    "single_delivery": "a job's message is not delivered again while it runs: no delivery finds it already"
    " succeeded or failed (submits that raised, which may resend, excepted)",
}
OUTCOME = {"completed": "succeeded", "failed": "failed", "cancelled": "cancelled"}
# An upstream call that reaches the simulator this soon after a cancel returned was sent before it:
# the node's request crossed the wire (and the loaded two-core machine) meanwhile.
CALL_SLACK_S = 0.25
# README: a running job's stream is aborted "within a second" of its cancel; doubled for a loaded machine.
CANCEL_GRACE_S = 2.0


@dataclass(frozen=True)
class Violation:
    invariant: str
    job_id: str  # "-" for fleet-wide findings
    evidence: dict[str, Any]

    def line(self) -> str:
        return f"{self.invariant} job={self.job_id} {json.dumps(self.evidence, default=str)[:1500]}"


@dataclass
class Final:
    """The state a settled run left, read straight from the servers."""

    records: dict[str, dict[str, str]]  # every job record in Redis, by job id
    logs: dict[str, list[Event]]  # every job's replay log, by job id
    calls: list[UpstreamCall]
    sim_stats: dict[str, Any]
    max_inflight: int
    unbounded: list[str] = field(default_factory=list)
    broker_residue: dict[str, Any] = field(default_factory=dict)
    node_exits: list[dict[str, Any]] = field(default_factory=list)
    deliveries: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # job id -> (node log, what)


def final_text(events: Iterable[Event]) -> str:
    """Content of choice 0's deltas since the last ``retry`` that started over: what a subscriber was left with.

    A retry that resumes (``resume: true``, Partial Mode) keeps the deltas before it.
    """
    text: list[str] = []
    for event in events:
        if event.type == "retry" and not event.resume:
            text = []
        elif event.type == "delta" and (event.index or 0) == 0:
            text.append(str((event.delta or {}).get("content") or ""))
    return "".join(text)


def check(history: History, final: Final) -> list[Violation]:
    """Every violation in the run, job by job and then fleet-wide."""
    found: list[Violation] = []
    tags = history.job_ids()
    calls: dict[str, list[UpstreamCall]] = defaultdict(list)
    for call in final.calls:
        if call.tag is not None:
            calls[call.tag].append(call)
    raw = _raw_by_job(history)
    for job_id, tag in sorted(tags.items()):
        found += _check_job(history, final, job_id, calls.get(tag, []), raw.get(job_id, {}))
    found += _check_deliveries(history, final)
    found += _check_submits(history)
    found += _check_cancels(history, final, calls)
    unended = {v.job_id for v in found if v.invariant == "job_ends"}
    with history.lock:
        holder_lost = [f for f in history.faults if f.kind in HOLDER_LOST]
    found += _check_fleet(final, set(tags), unended, holder_lost)
    return found


def _raw_by_job(history: History) -> dict[str, dict[int, set[str]]]:
    out: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    with history.lock:
        for message in history.raw:
            if message.seq is not None:
                out[message.job_id][message.seq].add(message.data)
    return out


def _check_job(
    history: History, final: Final, job_id: str, calls: list[UpstreamCall], raw: dict[int, set[str]]
) -> list[Violation]:
    record = final.records.get(job_id)
    if record is None:
        return [Violation("job_ends", job_id, {"problem": "no record at the end (lost or expired)"})]
    log = final.logs.get(job_id, [])
    out: list[Violation] = []
    status = record.get("status")
    if status not in OUTCOME.values():
        tail = [(e.seq, e.type, e.reason) for e in log[-4:]]
        out.append(Violation("job_ends", job_id, {"status": status, **_brief(record), "log_tail": tail}))
    terminals = [(e.seq, e.type) for e in log if e.terminal]
    if len(terminals) != 1 or not log or not log[-1].terminal:
        out.append(Violation("one_terminal", job_id, {"terminal_events": terminals, "log_len": len(log)}))
    elif OUTCOME[terminals[0][1]] != status:
        out.append(Violation("one_terminal", job_id, {"terminal_event": terminals[0][1], "record_status": status}))
    seqs = [e.seq for e in log]
    if seqs != list(range(1, len(seqs) + 1)) or len(seqs) != int(record.get("seq") or 0):
        out.append(Violation("seq_contiguous", job_id, {"log_seqs": _runs(seqs), "record_seq": record.get("seq")}))
    out += _check_follower(history, job_id, log)
    for seq, copies in sorted(raw.items()):
        logged = log[seq - 1] if 0 < seq <= len(log) and log[seq - 1].seq == seq else None
        parsed = {Event.model_validate_json(c).model_dump_json() for c in copies}
        if len(parsed) > 1 or (logged is not None and parsed != {logged.model_dump_json()}):
            evidence = {"seq": seq, "published": sorted(copies)[:3], "logged": logged and logged.model_dump_json()}
            out.append(Violation("followers_agree", job_id, {"problem": "conflicting copies of one seq", **evidence}))
    if log and log[-1].type == "completed":
        out += _check_text(history, job_id, log)
    retries = sum(1 for e in log if e.type == "retry")
    if len(calls) > 1 + retries:
        starts = [round(c.start, 3) for c in calls]
        out.append(
            Violation("upstream_calls", job_id, {"calls": len(calls), "retry_events": retries, "starts": starts})
        )
    return out


def _brief(record: dict[str, str]) -> dict[str, Any]:
    return {k: record.get(k) for k in ("attempt", "seq", "owner", "heartbeat_at", "cancel_requested")}


def _runs(seqs: list[int]) -> str:
    """``1-40,42,44-50``: a seq list, short enough for a report."""
    parts: list[str] = []
    start = prev = None
    for s in [*seqs, None]:
        if s is not None and prev is not None and s == prev + 1:
            prev = s
            continue
        if start is not None:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = s
    return ",".join(parts)


def _check_follower(history: History, job_id: str, log: list[Event]) -> list[Violation]:
    with history.lock:
        seen = list(history.followed.get(job_id, []))
        unfinished = job_id in history.follower_unfinished
    got = [r.event.seq for r in seen]
    out: list[Violation] = []
    if got != list(range(1, len(got) + 1)):
        out.append(Violation("seq_contiguous", job_id, {"follower_seqs": _runs(got)}))
    if unfinished or not seen or not seen[-1].event.terminal:
        last = seen[-1].event.type if seen else None
        out.append(Violation("followers_agree", job_id, {"problem": "follower never got the end", "last": last}))
    elif [(r.event.seq, r.event.type) for r in seen] != [(e.seq, e.type) for e in log]:
        mine, logged = [(r.event.seq, r.event.type) for r in seen], [(e.seq, e.type) for e in log]
        first = next(
            (i for i, (a, b) in enumerate(zip(mine, logged, strict=False)) if a != b), min(len(mine), len(logged))
        )
        evidence = {"problem": "follower's events differ from the log", "at": first}
        out.append(
            Violation(
                "followers_agree",
                job_id,
                {**evidence, "follower": mine[first : first + 3], "log": logged[first : first + 3]},
            )
        )
    return out


def _check_text(history: History, job_id: str, log: list[Event]) -> list[Violation]:
    result = log[-1].result or {}
    choices = result.get("choices") or [{}]
    content = str((choices[0].get("message") or {}).get("content") or "")
    out = []
    views = {"log": final_text(log)}
    with history.lock:
        seen = [r.event for r in history.followed.get(job_id, [])]
    if seen and seen[-1].terminal:
        views["follower"] = final_text(seen)
    for view, text in views.items():
        if text != content:
            evidence = {"view": view, "result": content[:200], "deltas": text[:200], "len": [len(content), len(text)]}
            out.append(Violation("result_text", job_id, evidence))
    return out


def _check_submits(history: History) -> list[Violation]:
    ids: dict[str, set[str]] = defaultdict(set)
    with history.lock:
        for s in history.submits:
            if s.idempotency_key is not None and s.job_id is not None:
                ids[s.idempotency_key].add(s.job_id)
    return [Violation("idempotency", sorted(v)[0], {"key": k, "jobs": sorted(v)}) for k, v in ids.items() if len(v) > 1]


def _check_deliveries(history: History, final: Final) -> list[Violation]:
    """A delivery that found its job succeeded or failed was a copy of a message whose job was live.

    Excused: a job whose submit raised (the producer may have sent it twice), a job in flight while
    nothing could beat for it for a whole visibility timeout (Redis paused, or its node paused or cut off
    that long): its message coming back then is the visibility timeout doing its job; a job in flight (or
    just ended) when Redis restarted, which may roll back its last second; and on RabbitMQ, a job whose
    node's broker connection dropped.
    """
    with history.lock:
        resent = {s.tag for s in history.submits if s.error is not None}
        first: dict[str | None, float] = {}
        for s in history.submits:
            first.setdefault(s.job_id, s.t)
        faults = [f for f in history.faults if f.kind in SILENCING and _lasted(f) >= VISIBILITY_TIMEOUT_S]
        faults += [f for f in history.faults if f.kind in BROKER_REQUEUES]
        restarts = [f for f in history.faults if f.kind == "redis_restart"]
        kills = [f for f in history.faults if f.kind in STOPPING]
    out = []
    for job_id, tag in sorted(history.job_ids().items()):
        seen = final.deliveries.get(job_id, [])
        late = [d for d in seen if d[1] in ("skipped:succeeded", "skipped:failed")]
        if not late or tag in resent:
            continue
        _, ended = _ended_at(history, job_id)
        nodes = {log.split("-g")[0] for log, _ in seen}
        silenced = [
            f
            for f in faults
            if f.t_inject < (ended or float("inf"))
            and (f.t_heal or float("inf")) > first[job_id]
            and (f.target in ("redis", "rabbitmq") or nodes & set(f.target.split("+")))
        ]
        # A node stopped between a job's end and its ack leaves the message to come back: at least once.
        stopped = [
            f
            for f in kills
            if nodes & set(f.target.split("+")) and first[job_id] < f.t_inject < (ended or 0) + KILL_WINDOW_S
        ]
        # A Redis restart loses up to a second of writes (AOF everysec: docs/guarantees.md): heartbeats, and
        # an ack or a job's end written just before it. Its messages coming back is at-least-once delivery
        # working; that they do not run twice is the upstream_calls invariant's to check.
        rolled_back = [
            f for f in restarts if f.t_inject < (ended or float("inf")) + AOF_LOSS_S and (f.t_heal or 0) > first[job_id]
        ]
        if not silenced and not stopped and not rolled_back:
            out.append(Violation("single_delivery", job_id, {"deliveries": seen}))
    return out


# What a Redis restart may roll back with appendfsync everysec, plus a heartbeat to notice.
AOF_LOSS_S = 2.0
# Faults during which a node's heartbeats cannot reach Redis.
SILENCING = ("redis_pause", "pause", "pause_then_kill", "link_blackhole", "redis_restart")
# RabbitMQ hands a node's deliveries to another as soon as its connection drops, the node alive or not
# (README, "RabbitMQ as the broker"): the copy waits, and finds the job ended.
BROKER_REQUEUES = ("amqp_cut", "broker_restart")
# Faults that stop a node, and how long after a job's end (as a follower saw it) one may still have
# caught the node before it acknowledged the job's message.
# Faults that can lose the ack of a job that just ended: its node stops, or its link to the broker is cut
# (worker/transport.py: an ack lost with its connection is redelivered after the visibility timeout).
STOPPING = ("sigkill", "sigterm", "clock_skew", "pause_then_kill", "link_cut", "link_refuse")
KILL_WINDOW_S = 2.0


def _lasted(fault: Fault) -> float:
    return (fault.t_heal or float("inf")) - fault.t_inject


def _ended_at(history: History, job_id: str) -> tuple[str | None, float | None]:
    """The terminal event a follower received, and when (test clock)."""
    with history.lock:
        seen: list[Received] = list(history.followed.get(job_id, []))
    if seen and seen[-1].event.terminal:
        return seen[-1].event.type, seen[-1].t
    return None, None


def _check_cancels(history: History, final: Final, calls: dict[str, list[UpstreamCall]]) -> list[Violation]:
    out: list[Violation] = []
    with history.lock:
        acked = [c for c in history.cancels if c.returned and c.t_return is not None]
    for c in acked:
        assert c.t_return is not None
        late = [
            round(call.start - c.t_return, 3) for call in calls.get(c.tag, []) if call.start > c.t_return + CALL_SLACK_S
        ]
        if late:
            found = {"why": c.why, "calls_started_s_after_ack": late, "log_tail": _tail(final, c.job_id)}
            out.append(Violation("cancel_no_call", c.job_id, found))
        kind, at = _ended_at(history, c.job_id)
        if kind is None:
            log = final.logs.get(c.job_id, [])
            kind = log[-1].type if log and log[-1].terminal else None
        if kind not in (None, "cancelled") and (at is None or at > c.t_return + CANCEL_GRACE_S):
            ended = None if at is None else round(at - c.t_return, 3)
            evidence = {"why": c.why, "ended": kind, "ended_s_after_ack": ended, "log_tail": _tail(final, c.job_id)}
            out.append(Violation("cancel_honoured", c.job_id, evidence))
    return out


def _tail(final: Final, job_id: str) -> list[tuple[int, str, str | None]]:
    return [(e.seq, e.type, e.reason) for e in final.logs.get(job_id, [])[-3:]]


# Faults after which a node's in-flight leases lapse (lease_ttl_s without renewal: it looks dead) while the
# upstream may still count its open calls until it notices them gone: a stalled stream writes nothing for
# up to 7 s. docs/guarantees.md states this limit of the in-flight cap.
HOLDER_LOST = (
    "sigkill",
    "sigterm",
    "pause",
    "pause_then_kill",
    "link_blackhole",
    "link_cut",
    "link_refuse",
    "redis_pause",
)
HOLDER_GRACE_S = 3.0 + 7.0 + 1.0  # the tests' lease TTL, the longest stall, a second's slack


def _excused_overshoot(faults: list[Any], t: float) -> bool:
    return any(f.t_inject <= t <= (f.t_heal or f.t_inject) + HOLDER_GRACE_S for f in faults)


def _check_fleet(final: Final, known: set[str], unended: set[str], holder_lost: list[Any]) -> list[Violation]:
    out: list[Violation] = []
    for job_id, record in sorted(final.records.items()):
        if job_id not in known and record.get("status") not in OUTCOME.values():
            out.append(Violation("no_orphans", job_id, {"status": record.get("status"), **_brief(record)}))
            unended.add(job_id)
    for key in final.unbounded:
        # A job that never ended keeps its keys by design (reported as job_ends); Celery's reply queue for
        # the harness's start-up ping is the test's, not moonq's.
        if not any(job_id in key for job_id in unended) and ".reply.celery.pidbox" not in key:
            out.append(Violation("bounded_keys", "-", {"key": key}))
    if any(final.broker_residue.values()):
        out.append(Violation("broker_drained", "-", final.broker_residue))
    # Outside the windows where a silent holder's leases may lapse, the peak must stay under the cap; the
    # simulator's own refusals (over MOONQ_MAX_INFLIGHT + 2) can then only have happened inside them.
    rejected = int((final.sim_stats.get("rejected") or {}).get("concurrency", 0))
    peak, at, tags = peak_inflight(final.calls, lambda t: not _excused_overshoot(holder_lost, t))
    if peak > final.max_inflight + SIM_LIMIT_SLACK:
        evidence = {"limit": final.max_inflight, "sim_refused_over_limit": rejected, "peak_200_calls": peak}
        out.append(Violation("inflight_limit", "-", {**evidence, "peak_at": round(at, 3), "peak_tags": tags[:20]}))
    for exit_info in final.node_exits:
        out.append(Violation("nodes_stay_up", "-", exit_info))
    return out


def peak_inflight(
    calls: list[UpstreamCall], counts: Callable[[float], bool] = lambda t: True
) -> tuple[int, float, list[str]]:
    """Most answered (200) calls open at one moment (among moments ``counts`` accepts), when, and their tags."""
    edges = sorted(
        [(c.start, 1, c) for c in calls if c.status == 200]
        + [(c.end, -1, c) for c in calls if c.status == 200 and c.end],
        key=lambda e: (e[0], e[1]),  # at a tie an end goes first: back-to-back calls do not overlap
    )
    open_now: set[int] = set()
    peak, at, tags = 0, 0.0, []
    for t, step, call in edges:
        if step > 0:
            open_now.add(id(call))
        else:
            open_now.discard(id(call))
        if len(open_now) > peak and counts(t):
            peak, at = len(open_now), float(t)
            tags = [str(c.tag) for c in calls if id(c) in open_now]
    return peak, at, tags
