"""What a producer does with a job's events and record, without I/O: one algorithm, two clients.

``Client`` (threads) and ``AsyncClient`` (asyncio) are thin shells over this module: they read
Redis and wait on their inboxes; the decisions are made here, once.

- ``Follower``: yields a job's events exactly once, in ``seq`` order, from its replay log and its
  live channel (pub/sub is at-most-once; the log makes it exactly-once for the reader), and says
  when the log must be read: at the start, on a gap, after a quiet poll, and after a ``RESYNC``
  (the channel was (re)subscribed: a first confirmation, or a reconnect that may have lost
  messages). A log capped at ``max_events_per_job`` may have dropped entries a reader never saw:
  the follower then goes on from the oldest entry kept, and never waits for one trimmed.
- ``ResultWait``: when waiting for a job's outcome, whether the record says it ended (and how),
  how long to wait before looking again, and which deliveries are worth looking again for.

An inbox (one per follower, filled by the client's one shared pub/sub connection) holds
``Delivery`` items: a message's raw JSON, or ``RESYNC``. ``deliver`` bounds it.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable
from enum import Enum

from moonq.errors import JobCancelled, JobFailed, JobNotFound, JobTimeout
from moonq.record import JobRecord, JobStatus
from moonq.wire import TERMINAL_EVENTS, ChatCompletion, Event


class Signal(Enum):
    """A delivery that is not a message."""

    # The channel was subscribed (again): what was published before may be missing; read the log.
    RESYNC = "resync"


RESYNC = Signal.RESYNC
Delivery = bytes | Signal

# Unread deliveries an inbox keeps for a slow reader. Past this, they are dropped for one RESYNC:
# the log has every one of them, so memory stays bounded and nothing is lost.
INBOX_LIMIT = 10_000

# Longest wait for a job's outcome between two reads of its record: covers a lost terminal message.
RESULT_POLL_S = 1.0


def deliver(items: deque[Delivery], item: Delivery, limit: int = INBOX_LIMIT) -> None:
    """Append ``item`` to an inbox's queue; a queue already ``limit`` long is replaced by one ``RESYNC``."""
    if len(items) >= limit:
        items.clear()
        item = RESYNC
    items.append(item)


class Follower:
    """One reader's position in one job's event stream.

    Feed it log reads (``take_log``), live deliveries (``take_live``) and quiet polls (``quiet``);
    it returns the events to hand out, each once and in order. ``needs_log`` says the next step
    is a log read of entries from ``log_min``; ``done`` says iteration is over (the terminal event
    was handed out, or the job's record is gone).
    """

    def __init__(self, after_seq: int = 0, *, confirmation_coming: bool = False) -> None:
        self.last_seq = after_seq
        # Read first: the log holds everything published before the subscription was confirmed
        # (the confirmation's RESYNC reads it again, for what was published in between). A reader whose
        # own subscription's confirmation is on its way waits for that RESYNC instead: one log read, not
        # two (a gateway stream's read fewer per job), and none missed: its subscription is live by then.
        self.needs_log = not confirmation_coming
        self.done = False

    @property
    def log_min(self) -> str:
        """The first stream entry id the next log read needs (entry ids are ``<seq>-0``)."""
        return f"{self.last_seq + 1}-0"

    def take_log(self, events: Iterable[Event]) -> list[Event]:
        """The events of a log read (in log order) not handed out yet, up to the terminal one.

        The first entry may be later than ``last_seq + 1`` (a capped log trimmed the ones between):
        the log is the authority, so the follower goes on from there.
        """
        self.needs_log = False
        out: list[Event] = []
        for event in events:
            if self.done:
                break
            if event.seq > self.last_seq:
                out.append(self._hand_out(event))
        return out

    def take_live(self, item: Delivery) -> list[Event]:
        """The event of one live delivery if it is the next one; a gap or a ``RESYNC`` asks for the log."""
        if self.done:
            return []
        if isinstance(item, Signal):
            self.needs_log = True
            return []
        event = Event.model_validate_json(item)
        if event.seq <= self.last_seq:
            return []  # already handed out (from the log, or a duplicate delivery)
        if event.seq > self.last_seq + 1:
            self.needs_log = True  # missed one (lost message, reconnect): the log has it
            return []
        return [self._hand_out(event)]

    def quiet(self, *, job_exists: bool) -> None:
        """Nothing arrived for a poll interval: read the log (a message may have been lost), or stop
        if the job's record is gone (expired) - no terminal event will ever come."""
        if not job_exists:
            self.done = True
        else:
            self.needs_log = True

    def _hand_out(self, event: Event) -> Event:
        self.last_seq = event.seq
        self.done = event.terminal
        return event


def outcome_of(job_id: str, record: JobRecord) -> ChatCompletion:
    """The completion of an ended job's record, or the exception its ending calls for.

    Raises:
        JobCancelled: the job ended cancelled.
        JobFailed: the job ended failed (``.error`` is its ``{type, message, status}``).
    """
    if record.status is JobStatus.SUCCEEDED:
        return ChatCompletion.model_validate_json(record.result or "")
    if record.status is JobStatus.CANCELLED:
        raise JobCancelled(job_id, {"type": "cancelled", "message": "the job was cancelled", "status": None})
    raise JobFailed(job_id, record.error_info())


class ResultWait:
    """Waiting for one job's outcome, with an optional ``timeout_s`` counted from ``start`` (monotonic s)."""

    def __init__(self, job_id: str, timeout_s: float | None, start: float) -> None:
        self.job_id = job_id
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else start + timeout_s

    def step(self, record: JobRecord | None, now: float) -> ChatCompletion | float:
        """Given the record read at ``now``: the completion if the job ended, else how many seconds
        to wait for a waking delivery (``wakes``) before reading the record again.

        Raises:
            JobNotFound: no record (never submitted, or expired).
            JobFailed, JobCancelled: the job ended without a completion (see ``outcome_of``).
            JobTimeout: the deadline passed and the job has not ended.
        """
        if record is None:
            raise JobNotFound(self.job_id)
        if record.terminal:
            return outcome_of(self.job_id, record)
        if self.deadline is None:
            return RESULT_POLL_S
        left = self.deadline - now
        if left <= 0:
            raise JobTimeout(f"job {self.job_id} still {record.status.value} after {self.timeout_s}s")
        return min(RESULT_POLL_S, left)

    @staticmethod
    def wakes(item: Delivery) -> bool:
        """Whether a delivery calls for reading the record again: a terminal event (deltas are many
        and say nothing about the outcome), or a ``RESYNC`` (a terminal message may have been lost)."""
        return isinstance(item, Signal) or json.loads(item).get("type") in TERMINAL_EVENTS
