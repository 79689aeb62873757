"""The workload: what producers do during a nemesis run, drawn from the run's seed.

Jobs are submitted in bursts (so the fleet's in-flight limit binds now and then), each with a
unique marker in its user message (``tap.marker``); a quarter are long (every attempt stalls
mid-stream); most carry an idempotency key and some are submitted twice with it; some are
cancelled at once (queued), some a moment later (running). ``Scheduler`` runs the delayed actions.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from producers import Client
from tests.nemesis.cluster import Cluster
from tests.nemesis.history import Cancel, History, Observer, Submit
from tests.nemesis.tap import marker

# A submit that raised is tried again with its idempotency key for this long (Redis may be down).
SUBMIT_RETRY_S = 90.0


class Scheduler:
    """Actions due at a time, run in order by whoever calls ``run_due`` (one thread)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._count = itertools.count()
        self._lock = threading.Lock()

    def at(self, when: float, action: Callable[[], None]) -> None:
        with self._lock:
            heapq.heappush(self._heap, (when, next(self._count), action))

    def run_due(self, now: float | None = None) -> None:
        while True:
            with self._lock:
                if not self._heap or (now is not None and self._heap[0][0] > now):
                    return
                _, _, action = heapq.heappop(self._heap)
            action()

    def __len__(self) -> int:
        with self._lock:
            return len(self._heap)


def request_for(tag: str, rng: random.Random) -> dict[str, Any]:
    request: dict[str, Any] = {
        "model": "moonshot-v1-8k",
        "messages": [{"role": "user", "content": f"{marker(tag)} Tell me about queues."}],
    }
    roll = rng.random()
    if roll < 0.25:
        # A long job (every attempt stalls mid-stream, below the nodes' read timeout): still running when
        # the fault that follows its node strikes. Scripted requests get no random upstream fault.
        request["sim"] = {"fault": f"stall:{rng.choice([3, 5, 7])}"}
    elif roll < 0.5:
        request["max_tokens"] = rng.choice([16, 40])
    return request


class Workload:
    """Submits ``jobs`` jobs over about ``duration_s`` seconds; cancels and resubmits on a schedule."""

    def __init__(
        self, cluster: Cluster, history: History, observer: Observer, seed: int, jobs: int, duration_s: float
    ) -> None:
        self.cluster = cluster
        self.history = history
        self.observer = observer
        self.rng = random.Random(f"workload-{seed}")
        self.seed = seed
        self.jobs = jobs
        self.duration_s = duration_s
        self.later = Scheduler()
        self.done = threading.Event()

    def run(self) -> None:
        """Submit everything, then run the cancels and duplicates still due; sets ``done``."""
        try:
            with Client(settings=self.cluster.settings) as client:
                start = time.time()
                for i, offset in enumerate(self._submit_times()):
                    self._sleep_until(start + offset)
                    self._submit_one(client, f"s{self.seed}-{i}")
                while len(self.later):
                    self.later.run_due(time.time())
                    time.sleep(0.05)
        finally:
            self.done.set()

    def _sleep_until(self, when: float) -> None:
        while (now := time.time()) < when:
            self.later.run_due(now)
            time.sleep(min(0.05, when - now))
        self.later.run_due(time.time())

    def _submit_times(self) -> list[float]:
        """Bursts of 1-12 jobs at random moments, spread over ``duration_s``."""
        times: list[float] = []
        while len(times) < self.jobs:
            at = self.rng.uniform(0, self.duration_s)
            times += [at] * min(self.rng.randint(1, 12), self.jobs - len(times))
        return sorted(times)

    def _submit_one(self, client: Client, tag: str) -> None:
        request = request_for(tag, self.rng)
        key = f"nm-{tag}" if self.rng.random() < 0.6 else None
        job_id = self.submit(client, tag, request, key)
        if job_id is None:
            return
        if key is not None and self.rng.random() < 0.15:
            self.later.at(time.time() + self.rng.uniform(0, 6), lambda: self._resubmit(tag, request, key))
        roll = self.rng.random()
        if roll < 0.06:
            self._cancel(client, job_id, tag, "queued")
        elif roll < 0.14:
            delay = self.rng.uniform(0.3, 2.5)
            self.later.at(time.time() + delay, lambda: self._cancel(client, job_id, tag, "running"))

    def submit(
        self, client: Client, tag: str, request: dict[str, Any], key: str | None, duplicate: bool = False
    ) -> str | None:
        """Submit, trying again with the key while the submit raises; returns the job id (None: lost to an error)."""
        deadline = time.time() + SUBMIT_RETRY_S
        while True:
            try:
                job = client.submit(request, idempotency_key=key)
            except Exception as err:  # Redis or the broker away: the caller never learns an id
                self.history.add(Submit(tag, time.time(), None, key, duplicate, repr(err)[:300]))
                if key is None or time.time() > deadline:
                    return None
                time.sleep(0.5)
                continue
            self.history.add(Submit(tag, time.time(), job.id, key, duplicate))
            self.observer.follow(job.id)
            return job.id

    def _resubmit(self, tag: str, request: dict[str, Any], key: str) -> None:
        with Client(settings=self.cluster.settings) as client:
            self.submit(client, tag, request, key, duplicate=True)

    def _cancel(self, client: Client, job_id: str, tag: str, why: str) -> None:
        cancel(client, self.history, job_id, tag, why)


def cancel(client: Client, history: History, job_id: str, tag: str, why: str) -> None:
    """``job.cancel()``, logged with the moment it returned (its acknowledgement, when True)."""
    record = Cancel(job_id, tag, why, time.time())
    try:
        record.returned = client.job(job_id).cancel()
    except Exception as err:  # not acknowledged: the checker holds the job to nothing
        record.error = repr(err)[:300]
    record.t_return = time.time()
    history.add(record)
