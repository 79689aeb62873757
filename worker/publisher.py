"""Publishing a job's events: batched, ordered, and fenced by the job's owner token.

Deltas arrive many per second per stream. ``emit`` only queues; whatever a job has queued goes
out in a single ``APPEND_LUA`` call once its previous one is back, so a fast stream costs one
Redis round trip per batch rather than per chunk, while a slow stream still sends each delta at
once (nothing waits for a timer). ``finish`` writes the terminal event together with the job
record's final fields, atomically.

Across jobs, ``EventSink`` gathers the calls of every job of the process into one pipeline per
round trip, instead of one command each paying redis-py's pool checkout and timeout (200
concurrent calls go out in under 20 pipelines, tests/test_event_sink.py; the relay figures it
bought are in BENCHMARKS.md, "What profiling found").
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from moonq.eventlog import append_args, delta_body, event_body
from moonq.keys import Keys
from moonq.redisurl import is_cluster_client

# Most script calls in one pipeline; more wait for the next round trip.
MAX_PIPELINE = 512


def many_lua(script_text: str) -> str:
    """A script that runs ``script_text`` once per call packed in its KEYS and ARGV, each call apart.

    ARGV: the number of calls C, then each call's number of keys and of arguments, then every call's
    arguments in turn; KEYS: every call's keys in turn. Returns one reply per call: what the script
    returned, or, where it raised (a Redis error inside it, OOM say), that error as an error reply,
    so that one failed call fails only its caller, as a pipeline of separate calls would.

    Each call costs Redis what a call of its own would; what it saves is the client's: one command
    to pack, send and parse per round trip instead of one per call (redis-py reads a pipeline's
    replies one awaited parse each).
    """
    return (
        "local function call(KEYS, ARGV)\n"
        + script_text
        + """
end
local count = tonumber(ARGV[1])
local out, k, a = {}, 0, 1 + 2 * count
for i = 1, count do
  local nk, na = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local keys, argv = {}, {}
  for j = 1, nk do keys[j] = KEYS[k + j] end
  for j = 1, na do argv[j] = ARGV[a + j] end
  k, a = k + nk, a + na
  local ok, result = pcall(call, keys, argv)
  if not ok then
    result = {err = type(result) == 'table' and result.err or tostring(result)}
  elseif result == nil then
    result = false
  end
  out[i] = result
end
return out
"""
    )


# One script call: its keys, its arguments, and what takes its result (or its error) when it is back.
_Call = tuple[list[str], list[Any], Callable[[Any], None]]


class EventSink:
    """Runs ``APPEND_LUA`` for every job of the process, many calls to a pipeline.

    ``await sink(keys=..., args=...)`` returns what the script returned. One pipeline is in
    flight at a time; calls made meanwhile go out together in the next one. Each call is
    independent: a failed one fails only its caller.

    An ``EventWriter`` with deltas to send does not call: it marks itself (``mark``), and the
    sink takes its queued bodies as it builds the next pipeline. A relayed fragment then costs
    no task and no future of its own (a task and a future per fragment were a third of a node's
    CPU per fragment on paced streams; BENCHMARKS.md, "CPU per relayed fragment").
    """

    def __init__(self, redis: Redis, script_text: str) -> None:
        self._redis = redis
        self._text = script_text
        self._sha = redis.register_script(script_text).sha
        # On one Redis every call of a round trip goes in one script call; a cluster's calls name keys
        # of several slots, so they go as a pipeline of calls there.
        many = None if is_cluster_client(redis) else many_lua(script_text)
        self._many = None if many is None else (many, redis.register_script(many).sha)
        self._queue: list[_Call] = []
        self._marked: list[EventWriter] = []  # writers with bodies queued and none in flight, in order
        self._flusher: asyncio.Task[None] | None = None
        self._sending: list[_Call] = []  # the round trip in flight
        self.pipelines = 0
        self.calls = 0

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def settle(result: Any) -> None:
            if future.done():  # the caller was cancelled meanwhile
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        self._queue.append((keys, args, settle))
        self._wake()
        return await future

    def mark(self, writer: EventWriter) -> None:
        """``writer`` has bodies to send: take them into the next pipeline."""
        self._marked.append(writer)
        self._wake()

    def _wake(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
            self._flusher.add_done_callback(self._flusher_done)

    async def _flush(self) -> None:
        while self._queue or self._marked:
            batch, self._queue = self._queue[:MAX_PIPELINE], self._queue[MAX_PIPELINE:]
            room = MAX_PIPELINE - len(batch)
            if room and self._marked:
                writers, self._marked = self._marked[:room], self._marked[room:]
                batch += [writer.take() for writer in writers]
            self._sending = batch
            try:
                results = await self._send(batch)
            except Exception as err:  # the connection, after redis-py's own retries: every caller hears it
                results = [err] * len(batch)
            self._sending = []
            for (_, _, settle), result in zip(batch, results, strict=True):
                settle(result)  # a writer with more queued marks itself again: the loop goes on

    def _flusher_done(self, task: asyncio.Task[None]) -> None:
        """Cancelled (the node's loop closing), even before its first step: no caller or writer may wait
        for an answer forever."""
        if not task.cancelled() and task.exception() is None:
            return
        stopped = RuntimeError("the event sink stopped")
        calls, self._sending, self._queue = self._sending + self._queue, [], []
        writers, self._marked = self._marked, []
        for _, _, settle in calls:
            settle(stopped)
        for writer in writers:
            writer.landed(stopped)

    async def _send(self, batch: list[_Call]) -> list[Any]:
        self.pipelines += 1
        self.calls += len(batch)
        try:
            return await self._run(batch)
        except Exception:
            # redis-py encodes every argument of the pipeline before it sends any: one argument that
            # cannot be encoded (a lone surrogate in a job's event) fails the whole batch with nothing
            # sent. Then each call is encoded alone; those that fail get their own error, the rest go
            # out again together (nothing of theirs ran, so nothing is written twice). Any other failure
            # (the connection, after redis-py's own retries) is every caller's error.
            unencodable = self._unencodable(batch)
            if not unencodable:
                raise
        results: list[Any] = [unencodable.get(i) for i in range(len(batch))]
        rest = [i for i in range(len(batch)) if i not in unencodable]
        if rest:
            for i, result in zip(rest, await self._run([batch[i] for i in rest]), strict=True):
                results[i] = result
        return results

    def _unencodable(self, batch: list[_Call]) -> dict[int, Exception]:
        """Index -> error of each call in ``batch`` whose keys or arguments redis-py cannot encode."""
        encoder = self._redis.get_encoder()  # type: ignore[no-untyped-call]  # the pipeline's own encoder
        failed: dict[int, Exception] = {}
        for i, (keys, args, _) in enumerate(batch):
            try:
                for arg in (*keys, *args):
                    encoder.encode(arg)
            except Exception as err:  # UnicodeEncodeError, or redis-py's DataError for a type it cannot send
                failed[i] = err
        return failed

    async def _run(self, batch: list[_Call]) -> list[Any]:
        """The batch's calls in one round trip: one script call running them all (``many_lua``) on one
        Redis, a pipeline of them on a cluster; those answered NOSCRIPT run again once it is loaded."""
        if self._many is not None:
            try:
                return await self._together(batch, self._many[1])
            except NoScriptError:
                # Redis restarted (or its scripts were flushed): nothing of the batch ran.
                await self._redis.script_load(self._many[0])
                return await self._together(batch, self._many[1])
        results = await self._pipeline(batch)
        if any(isinstance(r, NoScriptError) for r in results):
            # Redis restarted (or its scripts were flushed): load the script, run those calls again.
            # A NOSCRIPT call ran nothing, so running it again cannot write twice.
            await self._redis.script_load(self._text)
            again = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            for i, result in zip(again, await self._pipeline([batch[i] for i in again]), strict=True):
                results[i] = result
        return results

    async def _together(self, batch: list[_Call], sha: str) -> list[Any]:
        keys: list[str] = []
        argv: list[Any] = [len(batch)]
        for call_keys, call_args, _ in batch:
            argv += (len(call_keys), len(call_args))
        for call_keys, call_args, _ in batch:
            keys += call_keys
            argv += call_args
        results = await self._redis.execute_command(  # type: ignore[no-untyped-call]
            "EVALSHA", sha, len(keys), *keys, *argv
        )
        return list(results)

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.execute_command(
                    "EVALSHA", self._sha, len(keys), *keys, *args
                )  # cluster pipelines refuse evalsha()
            return await pipe.execute(raise_on_error=False)


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
        sink: EventSink,
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
        self._pending: list[str] = []  # bodies queued, not yet taken into a pipeline
        self._marked = False  # on the sink's list of writers to take from
        self._in_flight = 0  # bodies taken into the pipeline in flight
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

    def take(self) -> _Call:
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

    def _args(self, bodies: list[str], fields: dict[str, str]) -> tuple[list[str], list[str | int]]:
        return append_args(
            self._keys,
            self.job_id,
            bodies,
            ttl_s=self._ttl_s,
            owner=self._owner,
            expected_seq=self.seq,
            max_events=self._max_events,
            fields=fields,
            idempotency_key=self._idempotency_key,
            job_keys=self._job_keys,
        )

    async def _append(self, bodies: list[str], fields: dict[str, str]) -> None:
        keys, argv = self._args(bodies, fields)
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

    async def write(self, type: str | None, record: dict[str, Any], **fields: Any) -> None:
        """After everything queued: one event (or none) and job-record fields, in one atomic step.

        ``record`` maps ``JobField`` names (moonq/record.py) to values; a value that is not a
        string (a result, an error) is stored as compact JSON.
        """
        await self.drain()
        encoded = {k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in record.items()}
        await self._append([event_body(self.job_id, type, **fields)] if type else [], encoded)
