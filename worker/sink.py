"""One Lua script called by every job of a process, the calls gathered into one round trip.

A node runs some scripts once per fragment or per delivery for hundreds of jobs at once: the
event append (``APPEND_LUA``, per relayed fragment) and the webhook delivery settle. Each call
sent on its own pays redis-py's pool checkout, packing, a syscall each way and a parse;
``ScriptSink`` sends whatever calls are waiting as one call of ``many_lua`` (on one Redis) or one
pipeline (on a cluster, whose calls name keys of several slots), one round trip in flight at a
time (200 concurrent calls go out in under 20 round trips, tests/test_event_sink.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from moonq.redisurl import is_cluster_client

log = logging.getLogger("moonq.worker")

# Most script calls in one round trip; more wait for the next one.
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

    ``await sink(keys=..., args=...)`` returns what the script returned. One round trip is in
    flight at a time; calls made meanwhile go out together in the next one. Each call is
    independent: a failed one fails only its caller.

    A ``Taker`` (an ``EventWriter`` with deltas to send) does not call: it marks itself
    (``mark``), and the sink takes its queued work as it builds the next round trip. A relayed
    fragment then costs no task and no future of its own (a task and a future per fragment were
    a quarter of a node's CPU per fragment on paced streams; BENCHMARKS.md, "CPU per relayed
    fragment").
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
        self._sending: list[ScriptCall] = []  # the round trip in flight
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
        if not task.cancelled():
            error = task.exception()
            if error is None:
                return
            log.error("event=script_sink_failed error=%r", error, exc_info=error)
        stopped = RuntimeError("the event sink stopped")
        calls, self._sending, self._queue = self._sending + self._queue, [], []
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

    async def _together(self, batch: list[ScriptCall], sha: str) -> list[Any]:
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

    async def _pipeline(self, batch: list[ScriptCall]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.execute_command(
                    "EVALSHA", self._sha, len(keys), *keys, *args
                )  # cluster pipelines refuse evalsha()
            return await pipe.execute(raise_on_error=False)
