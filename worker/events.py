"""Publishing a job's events: batched, ordered, and fenced by the job's owner token.

Deltas arrive many per second per stream. ``emit`` only queues; one flusher per job sends
whatever has queued up in a single ``APPEND_LUA`` call, so a fast stream costs one Redis round
trip per batch rather than per chunk, while a slow stream still sends each delta at once
(nothing waits for a timer). ``finish`` writes the terminal event together with the job
record's final fields, atomically.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from producers.eventlog import append_args, delta_body, event_body
from producers.keys import Keys


class Fenced(Exception):
    """The job is no longer ours to write: it ended, expired, or another attempt owns it."""


class EventWriter:
    """Writes one job's events, in order, as the attempt holding ``owner``."""

    def __init__(
        self, redis: Redis, script: AsyncScript, keys: Keys, job_id: str, *, owner: str, ttl_s: int, seq: int
    ) -> None:
        self._redis = redis
        self._script = script
        self._keys = keys
        self.job_id = job_id
        self._owner = owner
        self._ttl_s = ttl_s
        self._pending: list[str] = []
        self._flusher: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self.seq = seq  # the last seq in the log, as this writer knows it
        self.events_written = 0
        self.round_trips = 0

    def emit(self, type: str, **fields: Any) -> None:
        """Queue an event; it is sent as soon as the previous batch is acknowledged."""
        if self._error is not None:
            raise self._error
        self._pending.append(event_body(self.job_id, type, **fields))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())

    def emit_delta(self, attempt: int, index: int, delta: dict[str, Any]) -> None:
        """``emit("delta", ...)`` without the model round trip (the per-chunk hot path)."""
        if self._error is not None:
            raise self._error
        self._pending.append(delta_body(self.job_id, attempt, index, delta))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._append(batch, {})
        except Exception as err:  # kept for the job's next emit/drain, which raises it in the job's task
            self._error = err

    async def _append(self, bodies: list[str], fields: dict[str, str]) -> None:
        keys, argv = append_args(
            self._keys, self.job_id, bodies, ttl_s=self._ttl_s, owner=self._owner, expected_seq=self.seq, fields=fields
        )
        self.round_trips += 1
        if not await self._script(keys=keys, args=argv, client=self._redis):
            raise Fenced(self.job_id)
        self.seq += len(bodies)
        self.events_written += len(bodies)

    async def drain(self) -> None:
        """Wait until every queued event is written."""
        if self._flusher is not None:
            # Shielded: a job being cancelled still gets its deltas out before its last event.
            await asyncio.shield(self._flusher)
        if self._error is not None:
            raise self._error

    async def write(self, type: str | None, record: dict[str, Any], **fields: Any) -> None:
        """After everything queued: one event (or none) and job-record fields, in one atomic step."""
        await self.drain()
        encoded = {k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in record.items()}
        await self._append([event_body(self.job_id, type, **fields)] if type else [], encoded)
