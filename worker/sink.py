"""One Lua script called by every job of a process, the calls gathered into one round trip.

A node runs some scripts once per fragment or per delivery for hundreds of jobs at once: the
event append (``APPEND_LUA``, per relayed fragment) and the webhook delivery settle. Each call
sent on its own pays redis-py's pool checkout, packing, a syscall each way and a parse;
``ScriptSink`` sends whatever calls are waiting as one call of ``many_lua`` (on one Redis) or one
pipeline (on a cluster, whose calls name keys of several slots, one round trip in flight at a
time there): 200 concurrent calls go out in under 20 round trips (tests/test_event_sink.py).

On one Redis the sink writes on a connection of its own, several round trips in flight, and writes
as soon as ``EAGER_CALLS`` calls are waiting, without waiting for its loop's next turn. Streams from
one upstream arrive in step (a model decodes a batch of answers a token at a time), so a node gets
its fragments in bursts: 100 streams at 50 tokens/s are 100 fragments every 20 ms, several ms of
decoding. Sent as one round trip after the whole burst, the burst's first fragment waited for all
of it; written in pieces as the node decodes them, it waits for a handful (BENCHMARKS.md, "Relay at
a realistic rate").
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import MaxConnectionsError, NoScriptError, ResponseError

from moonq.redisurl import is_cluster_client

log = logging.getLogger("moonq.worker")

# Most script calls in one round trip; more wait for the next one.
MAX_PIPELINE = 512
# Calls waiting that are written at once, from the call that makes them that many, rather than on the
# loop's next turn (one Redis only). Fewer: more round trips per fragment; more: a burst's first fragment
# waits behind more of its peers. At 100 streams, 4 and 8 gave no lower relay p99 than 16 and a few points
# more of the node's CPU (bench.relay_rate, 2 rounds each).
EAGER_CALLS = 16
# Most round trips written and not yet answered; more calls wait for one to be back.
MAX_IN_FLIGHT = 8


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
ScriptCall = tuple[list[str], list[Any], Callable[[Any], None]]


class Taker(Protocol):
    """Work that waits in its owner until the sink takes it (``EventWriter``): no future per call."""

    def take(self) -> ScriptCall:
        """The queued work as one call, now in flight."""
        ...

    def landed(self, result: Any) -> None:
        """The call ``take`` made is back: the script's answer, or an error."""
        ...


class ScriptSink:
    """Runs one script for every job of the process, many calls to a round trip.

    ``await sink(keys=..., args=...)`` returns what the script returned. Calls made while round
    trips are in flight go out together in the next one. Each call is independent: a failed one
    fails only its caller.

    A ``Taker`` (an ``EventWriter`` with deltas to send) does not call: it marks itself
    (``mark``), and the sink takes its queued work as it builds the next round trip. A relayed
    fragment then costs no task and no future of its own (a task and a future per fragment were
    a quarter of a node's CPU per fragment on paced streams; BENCHMARKS.md, "CPU per relayed
    fragment").

    On one Redis (module docstring) the round trips go over one connection the sink holds from the
    client's pool: up to ``MAX_IN_FLIGHT`` written, their replies read in order by one task (the
    pump), which alone (re)connects. A lost connection, a timeout or a flushed script (NOSCRIPT)
    makes it reconnect, load the script and write again every round trip not answered, under the
    client's retry policy, as redis-py retries a command of its own: a script call the sink may
    run twice must be idempotent (``APPEND_LUA`` is, for its owner). When the retries run out,
    the callers of the round trips in flight hear the error.
    """

    def __init__(self, redis: Redis, script_text: str) -> None:
        self._redis = redis
        self._text = script_text
        self._sha = redis.register_script(script_text).sha
        # On one Redis every call of a round trip goes in one script call; a cluster's calls name keys
        # of several slots, so they go as a pipeline of calls there.
        many = None if is_cluster_client(redis) else many_lua(script_text)
        self._many = None if many is None else (many, redis.register_script(many).sha)
        self._queue: list[ScriptCall] = []
        self._marked: list[Taker] = []  # takers with work queued and none in flight, in order
        self._flusher: asyncio.Task[None] | None = None
        self._sending: list[ScriptCall] = []  # the round trip in flight (cluster)
        self._conn: Any = None  # the connection of our own (one Redis), once the pump has it
        # It is connected, greeted (AUTH, SELECT) and holds again every round trip not answered: others may
        # write. (While redis-py greets a new connection it counts as connected; a write then would come
        # between the greeting's command and its reply.)
        self._live = False
        self._flights: deque[list[ScriptCall]] = deque()  # written, not answered, oldest first
        self.pipelines = 0  # round trips sent (one script call, or one pipeline on a cluster)
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

    def mark(self, writer: Taker) -> None:
        """``writer`` has work queued: take it into the next round trip."""
        self._marked.append(writer)
        self._wake()

    def _wake(self) -> None:
        if self._many is not None and len(self._queue) + len(self._marked) >= EAGER_CALLS and self._writable():
            self._write(self._next_batch())
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._pump() if self._many is not None else self._flush())
            self._flusher.add_done_callback(self._flusher_done)

    def _next_batch(self) -> list[ScriptCall]:
        batch, self._queue = self._queue[:MAX_PIPELINE], self._queue[MAX_PIPELINE:]
        room = MAX_PIPELINE - len(batch)
        if room and self._marked:
            writers, self._marked = self._marked[:room], self._marked[room:]
            batch += [writer.take() for writer in writers]
        return batch

    # One Redis: a connection of our own, round trips written as calls come, replies read by the pump.

    def _writable(self) -> bool:
        """A round trip may be written now: the pump holds a live connection and has room in flight."""
        conn = self._conn
        return self._live and conn.is_connected and len(self._flights) < MAX_IN_FLIGHT

    def _write(self, batch: list[ScriptCall]) -> None:
        """Write ``batch`` as one ``many_lua`` call now (no await); the pump reads its reply."""
        assert self._many is not None
        try:
            packed = self._pack(batch)
        except Exception as err:
            # A call whose arguments redis-py cannot encode (a lone surrogate in a job's event) fails the
            # packing of the whole batch, nothing written: it gets its own error, the rest go out.
            unencodable = self._unencodable(batch)
            if not unencodable:  # not the arguments: every call of the batch hears it
                unencodable = dict.fromkeys(range(len(batch)), err)
            for i, error in unencodable.items():
                batch[i][2](error)
            batch = [call for i, call in enumerate(batch) if i not in unencodable]
            if not batch:
                return
            packed = self._pack(batch)
        # redis-py's StreamWriter: its write is the socket's (buffered by asyncio only when the socket is
        # full), where ``send_packed_command`` would wait for the loop's next turn. ``_writer`` is redis-py's
        # own attribute, as are ``get_available_connection`` and ``is_connected`` below: the same in every
        # release pyproject.toml admits (6.4, 7.0 and 8.1 read; its pin stops before 9).
        self._conn._writer.writelines(packed)
        self._flights.append(batch)
        self.pipelines += 1
        self.calls += len(batch)

    def _pack(self, batch: list[ScriptCall]) -> list[bytes]:
        assert self._many is not None
        keys, argv = self._together_args(batch)
        packed: list[bytes] = self._conn.pack_command("EVALSHA", self._many[1], len(keys), *keys, *argv)
        return packed

    async def _pump(self) -> None:
        """Writes what waits and reads the replies in order, until nothing waits or is in flight."""
        while self._flights or self._queue or self._marked:
            retry = self._conn.retry if self._conn is not None else self._redis.get_retry()
            try:
                if retry is None:
                    batch, reply = await self._step()
                else:
                    batch, reply = await retry.call_with_retry(self._step, self._lost)
            except Exception as err:  # after the client's retries: every caller in flight or waiting hears it
                await self._reset()  # replies of what is failed here must not be read as others'
                calls = [call for batch in self._flights for call in batch]
                self._flights = deque()
                while self._queue or self._marked:
                    calls += self._next_batch()
                for _, _, settle in calls:
                    settle(err)
                continue
            for (_, _, settle), result in zip(batch, reply, strict=True):
                settle(result)  # a writer with more queued marks itself again: the loop goes on

    async def _step(self) -> tuple[list[ScriptCall], list[Any]]:
        """Connect if need be, write what waits (room allowing), read the oldest round trip's reply."""
        assert self._many is not None
        if self._conn is None:
            pool = self._redis.connection_pool
            # Held as in use for good, within the pool's bound; the client's close closes it.
            try:
                self._conn = pool.get_available_connection()  # type: ignore[no-untyped-call]
            except MaxConnectionsError:  # every connection in use: a bounded pool's wait
                self._conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        conn = self._conn
        if not self._live or not conn.is_connected:
            # A fresh connection: the old one may hold replies to round trips already settled (failed, or
            # stopped with the loop), which would be read as the replies of those written next.
            await self._reset()
            await conn.connect()
            for batch in self._flights:  # not answered: written again, in order (idempotent, class docstring)
                conn._writer.writelines(self._pack(batch))
            self._live = True
        while (self._queue or self._marked) and len(self._flights) < MAX_IN_FLIGHT:
            self._write(self._next_batch())
        if not self._flights:
            return [], []
        try:
            reply = await conn.read_response()
        except NoScriptError:
            # Redis restarted (or its scripts were flushed): nothing of this round trip ran; those written
            # after it may have. Load the script and write them all again.
            await self._reset()
            await self._redis.script_load(self._many[0])
            return await self._step()
        except ResponseError as err:  # the whole call refused (each call's own errors come in its reply)
            reply = [err] * len(self._flights[0])
        return self._flights.popleft(), list(reply)

    async def _lost(self, error: Exception) -> None:
        log.warning("event=script_sink_reconnect in_flight=%d error=%r", len(self._flights), error)
        await self._reset()

    async def _reset(self) -> None:
        """No writes until the pump has a fresh connection."""
        self._live = False
        if self._conn is not None:
            await self._conn.disconnect()

    # A cluster: one pipeline of calls at a time, through the client's pool.

    async def _flush(self) -> None:
        while self._queue or self._marked:
            batch = self._next_batch()
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
        if not task.cancelled():
            error = task.exception()
            if error is None:
                return
            log.error("event=script_sink_failed error=%r", error, exc_info=error)
        self._live = False  # what is settled below may still have replies on the connection: the next pump resets it
        stopped = RuntimeError("the event sink stopped")
        flights = [call for batch in self._flights for call in batch]
        calls, self._sending, self._queue, self._flights = self._sending + flights + self._queue, [], [], deque()
        writers, self._marked = self._marked, []
        for _, _, settle in calls:
            settle(stopped)
        for writer in writers:
            writer.landed(stopped)

    async def _send(self, batch: list[ScriptCall]) -> list[Any]:
        self.pipelines += 1
        self.calls += len(batch)
        try:
            return await self._run(batch)
        except Exception:
            # redis-py encodes every argument of a command or pipeline before it sends any: one argument that
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

    def _unencodable(self, batch: list[ScriptCall]) -> dict[int, Exception]:
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

    async def _run(self, batch: list[ScriptCall]) -> list[Any]:
        """The batch's calls in one round trip on a cluster: a pipeline of them; those answered NOSCRIPT
        run again once it is loaded."""
        results = await self._pipeline(batch)
        if any(isinstance(r, NoScriptError) for r in results):
            # Redis restarted (or its scripts were flushed): load the script, run those calls again.
            # A NOSCRIPT call ran nothing, so running it again cannot write twice.
            await self._redis.script_load(self._text)
            again = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            for i, result in zip(again, await self._pipeline([batch[i] for i in again]), strict=True):
                results[i] = result
        return results

    @staticmethod
    def _together_args(batch: list[ScriptCall]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of one ``many_lua`` call running every call of ``batch``."""
        keys: list[str] = []
        argv: list[Any] = [len(batch)]
        for call_keys, call_args, _ in batch:
            argv += (len(call_keys), len(call_args))
        for call_keys, call_args, _ in batch:
            keys += call_keys
            argv += call_args
        return keys, argv

    async def _pipeline(self, batch: list[ScriptCall]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.execute_command(
                    "EVALSHA", self._sha, len(keys), *keys, *args
                )  # cluster pipelines refuse evalsha()
            return await pipe.execute(raise_on_error=False)
