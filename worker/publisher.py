"""Publishing a job's events: batched, ordered, and fenced by the job's owner token.

Deltas arrive many per second per stream. ``emit`` only queues; whatever a job has queued goes
out in a single ``APPEND_LUA`` call once its previous one is back, so a fast stream costs one
Redis round trip per batch rather than per chunk, while a slow stream still sends each delta at
once (nothing waits for a timer). ``finish`` writes the terminal event together with the job
record's final fields, atomically.

Across jobs, a ``ScriptSink`` (worker/sink.py) gathers the appends of every job of the process
into one round trip, instead of one command each paying redis-py's pool checkout and timeout;
a writer waits in it as a ``Taker``, with no task or future per delta.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from moonq.eventlog import UNLESS_CANCELLED, append_args, delta_body, event_body
from moonq.keys import Keys
from worker.sink import ScriptCall, ScriptSink

# Deepest delta relayed. Real ones are a few levels (tool_calls[].function.arguments); pydantic, which
# every reader of the events parses them with, refuses JSON nested beyond ~255 levels.
MAX_DELTA_DEPTH = 64


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion (a hostile value may be very deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_DELTA_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


class Fenced(Exception):
    """The job is no longer ours to write: it ended, expired, or another attempt owns it."""


class EventWriter:
    """Writes one job's events, in order, as the attempt holding ``owner``."""

    def __init__(
        self,
        sink: ScriptSink,
        keys: Keys,
        job_id: str,
        *,
        owner: str,
        ttl_s: int,
        seq: int,
        max_events: int = 0,
        idempotency_key: str = "",
    ) -> None:
        self._sink = sink
        self._idempotency_key = idempotency_key  # expires with the job (APPEND_LUA)
        self._keys = keys
        self.job_id = job_id
        self._owner = owner
        self._ttl_s = ttl_s
        self._max_events = max_events  # the replay log keeps at most this many entries (0 = no cap)
        self._pending: list[str] = []  # bodies queued, not yet taken into a round trip
        self._marked = False  # on the sink's list of writers to take from
        self._in_flight = 0  # bodies taken into the round trip in flight
        self._idle: asyncio.Future[None] | None = None  # made by a drain that waits
        self._error: BaseException | None = None
        self.seq = seq  # the last seq in the log, as this writer knows it
        self._job_keys = append_args(keys, job_id, [], ttl_s=ttl_s)[0]  # made once: every append names them

    @property
    def owner(self) -> str:
        """The owner token this writer's writes are fenced by."""
        return self._owner

    def emit(self, type: str, **fields: Any) -> None:
        """Queue an event; it is sent as soon as the previous batch is acknowledged."""
        self._queue(event_body(self.job_id, type, **fields))

    def emit_delta(self, attempt: int, index: int, delta: dict[str, Any]) -> None:
        """``emit("delta", ...)`` without the model round trip (the per-chunk hot path).

        Raises:
            ValueError: the delta nests deeper than ``MAX_DELTA_DEPTH`` (readers could not parse it).
        """
        too_deep = not all(type(v) is str for v in delta.values()) and _depth(delta) > MAX_DELTA_DEPTH
        if too_deep and self._error is None:  # a write that already failed is raised first, by _queue
            raise ValueError(f"a delta nested more than {MAX_DELTA_DEPTH} levels deep")
        self._queue(delta_body(self.job_id, attempt, index, delta))

    def _queue(self, body: str) -> None:
        if self._error is not None:
            raise self._error
        self._pending.append(body)
        if not self._marked and not self._in_flight:
            self._marked = True
            self._sink.mark(self)

    def take(self) -> ScriptCall:
        """The sink's: every queued body as one ``APPEND_LUA`` call, now in flight."""
        bodies, self._pending = self._pending, []
        self._marked, self._in_flight = False, len(bodies)
        keys, argv = self._args(bodies, {})
        return keys, argv, self.landed

    def landed(self, result: Any) -> None:
        """The sink's: the call ``take`` made is back with ``result`` (the script's answer, or an error)."""
        if isinstance(result, BaseException):
            self._error = result  # raised by the job's next emit or drain, in the job's own task
        elif not result:
            self._error = Fenced(self.job_id)
        else:
            self.seq += self._in_flight
        self._in_flight = 0
        if self._pending and self._error is None:
            self._marked = True
            self._sink.mark(self)
        elif self._idle is not None:
            self._idle.set_result(None)
            self._idle = None

    def _args(
        self, bodies: list[str], fields: dict[str, str], require_status: str = ""
    ) -> tuple[list[str], list[str | int]]:
        return append_args(
            self._keys,
            self.job_id,
            bodies,
            ttl_s=self._ttl_s,
            owner=self._owner,
            require_status=require_status,
            expected_seq=self.seq,
            max_events=self._max_events,
            fields=fields,
            idempotency_key=self._idempotency_key,
            job_keys=self._job_keys,
        )

    async def _append(self, bodies: list[str], fields: dict[str, str], require_status: str = "") -> None:
        keys, argv = self._args(bodies, fields, require_status)
        if not await self._sink(keys=keys, args=argv):
            raise Fenced(self.job_id)
        self.seq += len(bodies)

    async def drain(self) -> None:
        """Wait until every queued event is written."""
        if self._marked or self._in_flight:
            if self._idle is None:
                self._idle = asyncio.get_running_loop().create_future()
            # Shielded: a job being cancelled still gets its deltas out before its last event.
            await asyncio.shield(self._idle)
        if self._error is not None:
            raise self._error

    async def write(
        self, type: str | None, record: dict[str, Any], *, unless_cancelled: bool = False, **fields: Any
    ) -> None:
        """After everything queued: one event (or none) and job-record fields, in one atomic step.

        ``record`` maps ``JobField`` names (moonq/record.py) to values; a value that is not a
        string (a result, an error) is stored as compact JSON. ``unless_cancelled``: refused (``Fenced``)
        once a cancel was asked for, as the job's own end is.
        """
        await self.drain()
        encoded = {k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in record.items()}
        require = UNLESS_CANCELLED if unless_cancelled else ""
        await self._append([event_body(self.job_id, type, **fields)] if type else [], encoded, require)
