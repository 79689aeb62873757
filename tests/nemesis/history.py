"""What a nemesis run did and saw, on one clock: submits, cancels, faults, and every event received.

Every time is unix seconds from the test process's ``time.time()``, the clock the upstream tap
uses too, so "this upstream call started after that cancel was acknowledged" compares like with
like. (A node's own clock may be skewed on purpose; event ``ts`` fields are never compared here.)

``Observer`` runs the followers: one ``AsyncClient`` follower per job (the SDK's view, what a
subscriber is left with), plus one raw pattern subscription that records every message published
on any job's channel, duplicates and strays included (pub/sub is at most once: it misses what is
published while it reconnects, and the checker only uses it to look for conflicting copies).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from moonq.settings import ClientSettings
from moonq.wire import Event
from producers import AsyncClient


@dataclass
class Submit:
    """One ``submit`` call. ``job_id`` None: it raised (``error``), so the caller never learnt an id."""

    tag: str
    t: float
    job_id: str | None
    idempotency_key: str | None
    duplicate: bool = False  # a deliberate resubmit of an earlier tag with the same key
    error: str | None = None


@dataclass
class Cancel:
    """One ``cancel()`` call: ``returned`` True means acknowledged at ``t_return``."""

    job_id: str
    tag: str
    why: str  # "queued", "running" or "after_cut"
    t_call: float
    t_return: float | None = None
    returned: bool | None = None
    error: str | None = None


@dataclass
class Fault:
    """One fault the nemesis injected: from ``t_inject`` until it healed (``t_heal``)."""

    kind: str
    target: str  # "node2", "redis", "rabbitmq"
    t_inject: float
    t_heal: float | None = None
    detail: str = ""
    # The node logs' sizes at injection: the jobs a node had received by then are in the first bytes.
    log_marks: dict[str, int] = field(default_factory=dict)


@dataclass
class Received:
    t: float
    event: Event


@dataclass
class RawMessage:
    t: float
    job_id: str
    seq: int | None
    type: str | None
    data: str


class History:
    """The run's log; appended to from several threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.submits: list[Submit] = []
        self.cancels: list[Cancel] = []
        self.faults: list[Fault] = []
        self.followed: dict[str, list[Received]] = {}
        self.follower_errors: dict[str, list[str]] = {}
        self.follower_unfinished: set[str] = set()
        self.raw: list[RawMessage] = []
        self.notes: list[str] = []

    def add(self, item: Submit | Cancel | Fault) -> None:
        with self.lock:
            if isinstance(item, Submit):
                self.submits.append(item)
            elif isinstance(item, Cancel):
                self.cancels.append(item)
            else:
                self.faults.append(item)

    def note(self, text: str) -> None:
        with self.lock:
            self.notes.append(f"{time.time():.3f} {text}")

    def job_ids(self) -> dict[str, str]:
        """job id -> tag, for every submit that returned an id."""
        with self.lock:
            return {s.job_id: s.tag for s in self.submits if s.job_id is not None}

    def active_jobs(self) -> list[str]:
        """Jobs a follower has seen an event of, and no terminal event yet (running or retrying)."""
        with self.lock:
            return [j for j, seen in self.followed.items() if seen and not seen[-1].event.terminal]

    def faults_by_kind(self) -> Counter[str]:
        with self.lock:
            return Counter(f.kind for f in self.faults)


class Observer:
    """Followers on an asyncio loop in a thread: ``follow(job_id)`` from any thread."""

    def __init__(self, settings: ClientSettings, history: History) -> None:
        self.settings = settings
        self.history = history
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="nemesis-observer", daemon=True)
        self._client: AsyncClient | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._raw: asyncio.Task[None] | None = None

    def start(self) -> Observer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self.loop).result(timeout=30)
        return self

    async def _open(self) -> None:
        self._client = AsyncClient(settings=self.settings, max_connections=20)
        self._raw = asyncio.create_task(self._listen_raw())

    def follow(self, job_id: str) -> None:
        """Start following ``job_id`` (once), from its first event."""
        self.loop.call_soon_threadsafe(self._start_follower, job_id)

    def _start_follower(self, job_id: str) -> None:
        if job_id not in self._tasks:
            with self.history.lock:
                self.history.followed.setdefault(job_id, [])
            self._tasks[job_id] = asyncio.create_task(self._follow(job_id))

    async def _follow(self, job_id: str) -> None:
        assert self._client is not None
        last = 0
        while True:
            try:
                async for event in self._client.job(job_id).events(after_seq=last, poll_s=0.5):
                    with self.history.lock:
                        self.history.followed[job_id].append(Received(time.time(), event))
                    last = event.seq
                    if event.terminal:
                        return
                return  # the record is gone: the checker finds that out on its own
            except asyncio.CancelledError:
                raise
            except Exception as err:  # Redis away longer than the client's retries: follow on from the last seq
                with self.history.lock:
                    self.history.follower_errors.setdefault(job_id, []).append(repr(err)[:300])
                await asyncio.sleep(0.5)

    async def _listen_raw(self) -> None:
        pattern = f"{self.settings.prefix}:events:*"
        while True:
            redis = Redis.from_url(self.settings.redis_url)
            try:
                async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.psubscribe(pattern)
                    async for msg in pubsub.listen():
                        self._record_raw(msg["channel"].decode().partition("}:")[2], msg["data"])  # after the group tag
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):
                    await redis.aclose()

    def _record_raw(self, job_id: str, data: bytes) -> None:
        text = data.decode(errors="replace")
        try:
            body: dict[str, Any] = json.loads(text)
        except ValueError:
            body = {}
        seq = body.get("seq") if isinstance(body.get("seq"), int) else None
        with self.history.lock:
            self.history.raw.append(RawMessage(time.time(), job_id, seq, body.get("type"), text))

    def wait(self, job_ids: list[str], timeout_s: float) -> list[str]:
        """Wait until the followers of ``job_ids`` end; returns those still following after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = [j for j in job_ids if j not in self._tasks or not self._tasks[j].done()]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop every follower (those not done are recorded as unfinished) and the loop."""

        async def close() -> None:
            unfinished = {j for j, t in self._tasks.items() if not t.done()}
            with self.history.lock:
                self.history.follower_unfinished |= unfinished
            tasks = [*self._tasks.values(), *([self._raw] if self._raw else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._client is not None:
                await self._client.close()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self.loop.close()
