"""One node's performance, each figure beside its baseline in the same run.

    python -m bench.perf [--sizes 100,300,1000] [--relay-streams 100] [--overhead-jobs 2000]

- **In-flight capacity**: N streaming jobs whose upstream takes 3 s to answer, through one
  ``celery -A worker worker`` node, vs a direct asyncio httpx client sending the same N
  requests to the same simulator; plus plain Celery (prefork, the ``openai`` SDK in a task).
- **Relay latency**: the simulator stamps every content fragment with its send time; a
  subscriber (``AsyncJob.events()``) takes the difference when the delta event reaches it.
  Baseline: the direct client reading the same stamped streams.
- **Per-job overhead**: jobs/s with a zero-latency upstream, one node vs the direct client vs a
  no-op Celery task on the same broker and pool.
- **Memory** per in-flight job (node RSS at the peak of N = max, minus idle) and **Redis
  commands** per job (``INFO commandstats``), producer side and node side.

Each simulator is its own process (``python -m simulator``), as is the node; the driver runs
the baselines and the subscribers. Results go to BENCHMARKS.md (section "Node performance")
and, when matplotlib is installed, to ``bench/plots/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from bench import celery_plain
from bench.fleets import API_KEY, clean_env, stop_all, tree_env, wait_for_nodes
from bench.report import write_section
from harness import RedisServer, WorkerProcess, free_port, wait_for_port
from moonq.broker import producer_app
from moonq.settings import ClientSettings
from moonq.wire import TERMINAL_EVENTS
from producers import AsyncClient, Client

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Node performance: in-flight capacity, relay latency, per-job overhead"
MODEL = "moonshot-v1-8k"
STAMP = re.compile(r"\[t=(\d+\.\d+)\]")
PREFIX = "perf"
# MOONQ_CONCURRENCY for the node under test; None = the node's own default (set by --concurrency).
CONCURRENCY: int | None = None


def body(i: int, *, stream: bool = True, stamp: bool = False) -> dict[str, Any]:
    req: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Question {i}: what is a queue?"}],
        "stream": stream,
    }
    if stamp:
        req["sim"] = {"fault": "ok", "stamp": True}
    return req


# ---------------------------------------------------------------- processes


class Sim:
    """``python -m simulator`` in its own process on a free port."""

    def __init__(self, *, latency_ms: float, chunk_ms: float, answer: tuple[int, int], per_chunk: int) -> None:
        self.port = free_port()
        self.cmd = [
            sys.executable,
            "-m",
            "simulator",
            "--port",
            str(self.port),
            "--latency-ms",
            str(latency_ms),
            "--chunk-interval-ms",
            str(chunk_ms),
            "--answer-tokens",
            str(answer[0]),
            str(answer[1]),
            "--tokens-per-chunk",
            str(per_chunk),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Sim:
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, timeout_s=20)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_all([self.proc], timeout_s=10)


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` figure in KiB (VmRSS, VmHWM, ...); 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (FileNotFoundError, StopIteration, ProcessLookupError):
        return 0


def rss_kib(pid: int) -> int:
    return status_kib(pid, "VmRSS")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PeakRss:
    """Samples a process's RSS every 20 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_kib(self.pid))

    def __enter__(self) -> PeakRss:
        self.peak = rss_kib(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def command_calls(r: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started (``INFO commandstats``)."""
    stats = r.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0) > 0}


class Node:
    """One ``celery -A worker worker`` node as users start it, with its metrics endpoint."""

    def __init__(
        self, redis_url: str, base_url: str, log_dir: Path, concurrency: int | None, tree: Path | None = None
    ) -> None:
        """``tree``: a baseline revision's files to start the node from (``bench.fleets.source_tree``)."""
        self.metrics_port = free_port()
        env = {
            "REDIS_URL": redis_url,
            "MOONQ_PREFIX": PREFIX,
            "MOONSHOT_BASE_URL": base_url,
            "MOONSHOT_API_KEY": API_KEY,
            "MOONQ_METRICS_PORT": str(self.metrics_port),
            "MOONQ_METRICS_HOST": "127.0.0.1",
        }
        if concurrency is not None:
            env["MOONQ_CONCURRENCY"] = str(concurrency)
        if tree is not None:
            env.update(tree_env(tree))
        self.worker = WorkerProcess(env, args=("-n", "perf@bench"), log_path=log_dir / "node.log", cwd=tree)
        self.worker.env = clean_env(env)
        self.settings = ClientSettings(redis_url=redis_url, prefix=PREFIX)

    def __enter__(self) -> Node:
        self.worker.start(wait=False)
        app = producer_app(self.settings)
        try:
            assert self.worker.proc is not None
            wait_for_nodes(app, ["perf@bench"], [self.worker.proc], [self.worker.log_path])
        finally:
            app.close()
        wait_for_port(self.metrics_port, timeout_s=20)
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.stop()

    @property
    def pid(self) -> int:
        assert self.worker.proc is not None
        return self.worker.proc.pid


class Ended:
    """Counts terminal events on every job's channel (one PSUBSCRIBE): how the driver sees jobs end.

    Watching pub/sub costs the node nothing, where polling its metrics or the job records would
    add load and Redis commands to what is measured.
    """

    def __init__(self, redis_url: str) -> None:
        self.count = 0
        self._pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self._pubsub.psubscribe(**{f"{PREFIX}:events:*": self._on_message})
        self._thread = self._pubsub.run_in_thread(sleep_time=0.01, daemon=True)

    def _on_message(self, message: dict[str, Any]) -> None:
        if json.loads(message["data"])["type"] in TERMINAL_EVENTS:
            self.count += 1

    def close(self) -> None:
        self._thread.stop()
        self._thread.join(timeout=5)
        self._pubsub.close()


def wait_until(count: Any, target: int, timeout_s: float, poll_s: float = 0.02) -> float:
    """Polls ``count()`` until it reaches ``target``; returns the monotonic time it did."""
    deadline = time.monotonic() + timeout_s
    while (n := count()) < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out at {n}/{target}")
        time.sleep(poll_s)
    return time.monotonic()


# ---------------------------------------------------------------- the direct client


async def direct(base_url: str, bodies: list[dict[str, Any]], limit: int | None = None) -> tuple[float, list[float]]:
    """Sends every body at once (at most ``limit`` at a time) with one httpx AsyncClient.

    Returns the wall time and, for stamped streams, each fragment's delay from its stamp.
    """
    gate = asyncio.Semaphore(limit or len(bodies))
    delays: list[float] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=limit or len(bodies))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=120) as client:

        async def one(req: dict[str, Any]) -> None:
            async with gate, client.stream("POST", "/chat/completions", json=req) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.time()
                    content = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                    delays.extend(now - float(m) for m in STAMP.findall(content))

        t0 = time.monotonic()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.monotonic() - t0, delays


async def direct_aiohttp(base_url: str, bodies: list[dict[str, Any]]) -> float:
    """The same as ``direct`` with aiohttp (the client moonq's node uses upstream): wall seconds."""
    import aiohttp

    headers = {"Authorization": f"Bearer {API_KEY}"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:

        async def one(req: dict[str, Any]) -> None:
            async with session.post(base_url + "/chat/completions", json=req) as response:
                response.raise_for_status()
                async for line in response.content:
                    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                        continue
                    json.loads(line[6:])

        t0 = time.monotonic()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.monotonic() - t0


def run_direct(base_url: str, bodies: list[dict[str, Any]], limit: int | None = None) -> tuple[float, list[float]]:
    return asyncio.run(direct(base_url, bodies, limit))


# ---------------------------------------------------------------- measurements


@dataclass
class Capacity:
    n: int
    direct_s: float
    moonq_s: float
    aiohttp_s: float
    peak_rss_kib: int = 0
    node_calls: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.moonq_s / self.direct_s


def moonq_batch(node: Node, client: Client, bodies: list[dict[str, Any]], timeout_s: float) -> float:
    """Submits ``bodies`` with submit_many and waits for the node to end them all; wall seconds."""
    # Subscribed only while this batch runs: parsing every delta of a later measurement would load the driver.
    ended = Ended(node.settings.redis_url)
    try:
        t0 = time.monotonic()
        client.submit_many(bodies)
        t1 = wait_until(lambda: ended.count, len(bodies), timeout_s, poll_s=0.005)
    finally:
        ended.close()
    return t1 - t0


def capacity(
    sizes: list[int], redis_url: str, log_dir: Path, rounds: int, small_pool: int
) -> tuple[list[Capacity], dict[str, Any]]:
    info: dict[str, Any] = {}
    out: list[Capacity] = []
    r = redis.Redis.from_url(redis_url)
    with Sim(latency_ms=3000, chunk_ms=0, answer=(20, 20), per_chunk=2) as sim:
        with Node(redis_url, sim.base_url, log_dir, CONCURRENCY) as node, Client(settings=node.settings) as client:
            moonq_batch(node, client, [body(i) for i in range(10)], 60)  # warm: connections, scripts, a few threads
            time.sleep(1.0)
            info["idle_rss_kib"] = rss_kib(node.pid)
            # Idle cost of the node (heartbeats, broker polling), subtracted from what jobs cost.
            before = command_calls(r)
            t0 = time.monotonic()
            time.sleep(2.0)
            info["idle_calls_per_s"] = sum(diff(command_calls(r), before).values()) / (time.monotonic() - t0)
            for n in sizes:
                bodies = [body(i) for i in range(n)]
                directs, aiohttps, moonqs, peaks = [], [], [], []
                calls: dict[str, int] = {}
                for _ in range(rounds):  # interleaved, so both see the same machine
                    directs.append(run_direct(sim.base_url, bodies)[0])
                    aiohttps.append(asyncio.run(direct_aiohttp(sim.base_url, bodies)))
                    before = command_calls(r)
                    with PeakRss(node.pid) as peak:
                        moonqs.append(moonq_batch(node, client, bodies, 120))
                    calls = diff(command_calls(r), before)
                    peaks.append(peak.peak)
                    time.sleep(0.5)
                med = statistics.median
                out.append(Capacity(n, med(directs), med(moonqs), med(aiohttps), max(peaks), calls))
                print(
                    f"  capacity N={n}: direct {out[-1].direct_s:.2f} s, moonq {out[-1].moonq_s:.2f} s"
                    f" ({out[-1].ratio:.2f}x), peak RSS {max(peaks) / 1024:.0f} MiB",
                    flush=True,
                )
            info["after_rss_kib"] = rss_kib(node.pid)
        # The same node with a small thread pool (moonq's old default): threads bound what is in flight.
        n = sizes[-1]
        with Node(redis_url, sim.base_url, log_dir, small_pool) as node, Client(settings=node.settings) as client:
            moonq_batch(node, client, [body(i) for i in range(10)], 60)
            info["small_pool"] = (small_pool, n, moonq_batch(node, client, [body(i) for i in range(n)], 300))
        print(f"  capacity N={n}, MOONQ_CONCURRENCY={small_pool}: {info['small_pool'][2]:.2f} s", flush=True)
    # Producer side: submit_many into a queue nobody consumes, on the same server.
    quiet = ClientSettings(redis_url=redis_url, prefix=f"q{uuid.uuid4().hex[:6]}")
    with Client(settings=quiet) as producer:
        before = command_calls(r)
        producer.submit_many([body(i) for i in range(1000)])
        info["producer_calls"] = diff(command_calls(r), before)
        info["producer_jobs"] = 1000
    return out, info


def plain_celery(redis_url: str, log_dir: Path, n: int) -> tuple[float, float]:
    """(direct s, plain Celery prefork + openai s) for n jobs with the 3 s upstream."""
    with Sim(latency_ms=3000, chunk_ms=0, answer=(20, 20), per_chunk=2) as sim:
        direct_s = run_direct(sim.base_url, [body(i) for i in range(n)])[0]
        env = clean_env({"BENCH_BROKER_URL": redis_url, "BENCH_BASE_URL": sim.base_url})
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.celery_plain",
            "worker",
            "-n",
            "plain@bench",
            "--loglevel",
            "WARNING",
        ]
        log = log_dir / "plain.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        app = celery_plain.make_app(redis_url)
        r = redis.Redis.from_url(redis_url)
        try:
            wait_for_nodes(app, ["plain@bench"], [proc], [log])
            r.delete(celery_plain.DONE_KEY)
            t0 = time.monotonic()
            with app.producer_or_acquire() as producer:
                for i in range(n):
                    app.send_task(celery_plain.OPENAI_CHAT, args=[{**body(i), "max_tokens": 64}], producer=producer)
            t1 = wait_until(lambda: int(r.get(celery_plain.DONE_KEY) or 0), n, 30 + 3 * n)
        finally:
            app.close()
            stop_all([proc])
    return direct_s, t1 - t0


@dataclass
class Overhead:
    jobs: int
    direct: float  # jobs/s
    moonq: float
    noop: float
    direct_cpu_ms: float  # CPU per job of the process doing the work
    moonq_cpu_ms: float
    noop_cpu_ms: float


def overhead(redis_url: str, log_dir: Path, jobs: int, rounds: int) -> Overhead:
    """Jobs/s with a zero-latency upstream: the direct client, one node, a no-op Celery task."""
    r = redis.Redis.from_url(redis_url)
    with Sim(latency_ms=0, chunk_ms=0, answer=(20, 20), per_chunk=2) as sim:
        bodies = [body(i) for i in range(jobs)]
        directs, direct_cpu = [], []
        for _ in range(rounds):
            c0 = time.process_time()
            directs.append(jobs / run_direct(sim.base_url, bodies, limit=64)[0])
            direct_cpu.append((time.process_time() - c0) / jobs)
        moonqs, moonq_cpu = [], []
        with Node(redis_url, sim.base_url, log_dir, CONCURRENCY) as node, Client(settings=node.settings) as client:
            moonq_batch(node, client, bodies[:50], 60)
            for _ in range(rounds):
                c0 = cpu_s(node.pid)
                moonqs.append(jobs / moonq_batch(node, client, bodies, 300))
                moonq_cpu.append((cpu_s(node.pid) - c0) / jobs)
        env = clean_env({"BENCH_BROKER_URL": redis_url})
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.celery_plain",
            "worker",
            "-n",
            "noop@bench",
            "-P",
            "threads",
            "-c",
            "64",
            "--prefetch-multiplier",
            "1",
            "--loglevel",
            "WARNING",
        ]
        log = log_dir / "noop.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        app = celery_plain.make_app(redis_url)
        noops, noop_cpu = [], []
        try:
            wait_for_nodes(app, ["noop@bench"], [proc], [log])
            for _ in range(rounds):
                r.delete(celery_plain.DONE_KEY)
                c0 = cpu_s(proc.pid)
                t0 = time.monotonic()
                with app.producer_or_acquire() as producer:
                    for b in bodies:
                        app.send_task(celery_plain.NOOP, args=[b], producer=producer)
                t1 = wait_until(lambda: int(r.get(celery_plain.DONE_KEY) or 0), jobs, 300)
                noops.append(jobs / (t1 - t0))
                noop_cpu.append((cpu_s(proc.pid) - c0) / jobs)
        finally:
            app.close()
            stop_all([proc])
    med = statistics.median
    return Overhead(
        jobs, med(directs), med(moonqs), med(noops), med(direct_cpu) * 1e3, med(moonq_cpu) * 1e3, med(noop_cpu) * 1e3
    )


@dataclass
class Relay:
    streams: int
    # Per round, seconds: stamp -> subscriber, stamp -> the event's ts (the node's part), stamp -> the
    # direct client, and event ts -> subscriber (the relay proper: chunk received to event delivered).
    rounds: list[tuple[list[float], list[float], list[float], list[float]]]
    node_cpu: float = 0.0  # CPU seconds the node used over its rounds (claims, streams, writes)

    def pooled(self, path: int) -> list[float]:
        """Every round's samples of one path (an index into a round)."""
        return [v for r in self.rounds for v in r[path]]

    @property
    def moonq(self) -> list[float]:
        return self.pooled(0)

    @property
    def upstream(self) -> list[float]:
        return self.pooled(1)

    @property
    def direct(self) -> list[float]:
        return self.pooled(2)

    @property
    def relayed(self) -> list[float]:
        return self.pooled(3)

    def median_pct(self, path: int, q: float) -> float:
        """The median over rounds of each round's ``q`` percentile of one path (an index into a round)."""
        return statistics.median(pct(r[path], q) for r in self.rounds)

    def round_pcts(self, path: int, q: float) -> str:
        return " / ".join(ms(pct(r[path], q)) for r in self.rounds)


async def _follow(
    client: AsyncClient, job_id: str, moonq: list[float], upstream: list[float], relayed: list[float]
) -> None:
    async for event in client.job(job_id).events(poll_s=0.5):
        now = time.time()
        content = (event.delta or {}).get("content") or ""
        for m in STAMP.findall(content):
            moonq.append(now - float(m))
            upstream.append(event.ts - float(m))
            relayed.append(now - event.ts)


async def _relay_moonq(
    settings: ClientSettings, bodies: list[dict[str, Any]]
) -> tuple[list[float], list[float], list[float]]:
    moonq: list[float] = []
    upstream: list[float] = []
    relayed: list[float] = []
    async with AsyncClient(settings=settings) as client:
        jobs = await client.submit_many(bodies)
        await asyncio.gather(*(_follow(client, job.id, moonq, upstream, relayed) for job in jobs))
    return moonq, upstream, relayed


def relay(redis_url: str, log_dir: Path, streams: int, rounds: int) -> Relay:
    # 1 s to the first token leaves the subscribers time to attach; then ~50 fragments 20 ms apart.
    out: list[tuple[list[float], list[float], list[float], list[float]]] = []
    node_cpu = 0.0
    with Sim(latency_ms=1000, chunk_ms=20, answer=(50, 50), per_chunk=1) as sim:
        bodies = [body(i, stamp=True) for i in range(streams)]
        with Node(redis_url, sim.base_url, log_dir, CONCURRENCY) as node:
            with Client(settings=node.settings) as client:
                moonq_batch(node, client, bodies[:5], 60)
            for _ in range(rounds):  # interleaved, so both see the same machine
                _, direct_delays = run_direct(sim.base_url, bodies)
                c0 = cpu_s(node.pid)
                moonq, upstream, relayed = asyncio.run(_relay_moonq(node.settings, bodies))
                node_cpu += cpu_s(node.pid) - c0
                out.append((moonq, upstream, direct_delays, relayed))
    return Relay(streams, out, node_cpu)


# ---------------------------------------------------------------- report


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(v: float) -> str:
    return f"{v * 1000:.2f} ms"


def per_job(calls: dict[str, int], jobs: int, idle: float = 0.0) -> tuple[float, str]:
    total = (sum(calls.values()) - idle) / jobs
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:6]
    return total, ", ".join(f"{name} {n / jobs:.1f}" for name, n in top)


def section(
    caps: list[Capacity],
    info: dict[str, Any],
    plain: tuple[int, float, float],
    ov: Overhead,
    rl: Relay,
    args: argparse.Namespace,
    total_s: float,
) -> str:
    biggest = caps[-1]
    mem_per_job = (biggest.peak_rss_kib - info["idle_rss_kib"]) / biggest.n
    idle = info["idle_calls_per_s"] * biggest.moonq_s
    node_per_job, node_top = per_job(biggest.node_calls, biggest.n, idle)
    prod_per_job, prod_top = per_job(info["producer_calls"], info["producer_jobs"])
    n_plain, plain_direct, plain_s = plain
    small_c, small_n, small_s = info["small_pool"]
    lines = [
        SECTION,
        "",
        f"`make bench` (step `.venv/bin/python -m bench.perf --sizes {args.sizes} --rounds {args.rounds}"
        f" --relay-streams {args.relay_streams} --overhead-jobs {args.overhead_jobs}`),"
        f" {time.strftime('%Y-%m-%d')}; the whole run took {total_s:.0f} s. Machine as above. One node ="
        " `celery -A worker worker` with its defaults; the simulator runs in its own process; the direct"
        " client (one `httpx.AsyncClient`, all requests at once) runs in the driver. Medians of"
        f" {args.rounds} rounds.",
        "",
        "### In-flight capacity: N streaming jobs, 3 s to the first token, 20-token answers",
        "",
        "| N | direct asyncio httpx | moonq, one node | ratio | goal | direct aiohttp (for reference) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {c.n:,} | {c.direct_s:.2f} s | {c.moonq_s:.2f} s | {c.ratio:.2f}x | "
            f"{'met' if c.ratio <= 1.3 else 'missed'} (<= 1.3x) | {c.aiohttp_s:.2f} s |"
            for c in caps
        ),
        f"| {small_n:,} | {biggest.direct_s:.2f} s | moonq with `MOONQ_CONCURRENCY={small_c}`: {small_s:.2f} s |"
        f" {small_s / biggest.direct_s:.2f}x | (comparison) | |",
        f"| {n_plain} | {plain_direct:.2f} s | plain Celery, prefork (-c 2), openai SDK: {plain_s:.2f} s |"
        f" {plain_s / plain_direct:.1f}x | (baseline) | |",
        "",
        "moonq's time runs from `submit_many` to the last job's terminal event seen on pub/sub;"
        " the direct clients' from their first request to their last stream's end. Direct and moonq"
        " rounds alternate, so both see the same machine. Plain Celery ran"
        f" {n_plain} jobs (rounds of 2 at a time: N = 1,000 would take ~25 minutes). The node streams"
        " upstream with aiohttp (see `worker/upstream.py`), which is why it can beat the httpx client.",
        "",
        "### Relay latency: upstream fragment sent -> delta event at a subscriber",
        "",
        f"{rl.streams} concurrent streams, 50 fragments each 20 ms apart, {len(rl.rounds)} rounds (each a direct run"
        " then a moonq run, on the same node); every fragment is stamped by the simulator when sent"
        ' (`"sim": {"stamp": true}`) and timed where it arrives. p50 and p99 are the medians of the'
        " rounds' own percentiles; the rounds' p99s are listed to show the spread.",
        "",
        "| path | samples | p50 | p99 | p99 of each round | max |",
        "|---|---|---|---|---|---|",
        *(
            f"| {label} | {len(values):,} | {ms(rl.median_pct(i, 0.5))} | {ms(rl.median_pct(i, 0.99))} |"
            f" {rl.round_pcts(i, 0.99)} | {ms(max(values))} |"
            for i, label, values in (
                (2, "direct client (baseline: the network hop alone)", rl.direct),
                (1, "moonq: simulator -> event written by the node (`event.ts`)", rl.upstream),
                (0, "moonq: simulator -> `AsyncJob.events()` subscriber", rl.moonq),
                (3, "**moonq relay: event written by the node -> subscriber**", rl.relayed),
            )
        ),
        "",
        f"The node spent {rl.node_cpu / max(len(rl.moonq), 1) * 1e6:.0f} us of CPU per relayed fragment"
        " (its whole CPU time over the runs, claims and job ends included, divided by the fragments):"
        f" one node saturates one core at about {max(len(rl.moonq), 1) / max(rl.node_cpu, 1e-9):,.0f}"
        " fragments/s.",
        "",
        "The relay proper, from the node having the chunk (the event's `ts` is taken as the node turns"
        " the decoded chunk into its delta event) to the subscriber holding the event, is the last row:"
        f" p50 {ms(rl.median_pct(3, 0.5))}, p99 {ms(rl.median_pct(3, 0.99))}; goal p99 under 5 ms:"
        f" {'met' if rl.median_pct(3, 0.99) < 0.005 else 'missed'}. End to end, from the simulator's send, the"
        f" subscriber sees a fragment {ms(rl.median_pct(0, 0.5) - rl.median_pct(2, 0.5))} (p50) and"
        f" {ms(rl.median_pct(0, 0.99) - rl.median_pct(2, 0.99))} (p99) later than a direct client reading the"
        " same streams.",
        "",
        f"### Per-job overhead: {ov.jobs:,} jobs, zero-latency upstream, 20-token streams",
        "",
        "| system | jobs/s | vs direct | CPU per job (its process) |",
        "|---|---|---|---|",
        f"| direct asyncio httpx (64 at a time) | {ov.direct:,.0f} | 1.00x | {ov.direct_cpu_ms:.2f} ms |",
        f"| moonq, one node | {ov.moonq:,.0f} | {ov.moonq / ov.direct:.2f}x | {ov.moonq_cpu_ms:.2f} ms |",
        f"| no-op Celery task (threads -c 64, prefetch 1, late ack), same broker | {ov.noop:,.0f} |"
        f" {ov.noop / ov.direct:.2f}x | {ov.noop_cpu_ms:.2f} ms |",
        "",
        "CPU per job: the driver process for the direct client (`time.process_time`), the node's or the"
        " no-op worker's process for the others (`/proc/<pid>/stat`). The simulator, Redis and the"
        " driver share the same 2 cores, so jobs/s is a whole-machine figure and CPU per job is the"
        " one to compare for overhead.",
        "",
        "### What profiling found",
        "",
        "Found with `py-spy record -p <node pid> --gil -f raw` during these runs, on this machine (the"
        " intermediate figures were taken while other test runs shared the machine, so read them as"
        " orders of magnitude), and fixed in this order:",
        "",
        "1. At N = 1,000 the node's redis-py (8.x) asyncio pool raised `MaxConnectionsError` past 100"
        " connections (4,266 times in one run), and every such delivery was requeued: 29.6 s against"
        " 9.2 s direct. A bounded *blocking* pool (`MOONQ_REDIS_MAX_CONNECTIONS`) made it 12.4 s.",
        "2. Relay at 100 streams: subscriber p50 162 ms, p99 1.3 s. Each `AsyncJob.events()` held its own"
        " pub/sub connection (the same pool limit) and re-read the log on every message; now one shared"
        " subscription per client hands over messages in seq order (`producers/fanout.py`): p50 35 ms.",
        "3. The node's loop was saturated: httpx's read path took 44% of its CPU, one `EVALSHA` per"
        " fragment 24%. httpx costs 70 us per fragment against aiohttp's 19 us (100 streams, decoding"
        " included): upstream streams moved to aiohttp (p50 30 ms, p99 152 ms). Then every job's log"
        " appends went into one pipeline per round trip (`EventSink` then, now `ScriptSink`): p50 3.4 ms,"
        " p99 13 ms under load, and the figures above on a quiet machine.",
        "",
        "### Memory and Redis commands per job",
        "",
        "| figure | value |",
        "|---|---|",
        f"| node RSS idle (after warm-up) | {info['idle_rss_kib'] / 1024:.0f} MiB |",
        f"| node RSS peak at N = {biggest.n:,} in flight | {biggest.peak_rss_kib / 1024:.0f} MiB |",
        f"| memory per in-flight job | {mem_per_job:.0f} KiB |",
        f"| node RSS after the runs | {info['after_rss_kib'] / 1024:.0f} MiB |",
        f"| Redis commands per job, node side (N = {biggest.n:,}, idle traffic subtracted) | {node_per_job:.1f}"
        f" ({node_top}) |",
        f"| Redis commands per job, producer (`submit_many`) | {prod_per_job:.1f} ({prod_top}) |",
        "",
        "Commands are `INFO commandstats` calls, which count the commands a Lua script runs: each event is"
        " one XADD and one PUBLISH inside `APPEND_LUA`, and the node sends every job's appends in one script"
        " call per round trip (`ScriptSink`: `APPEND_LUA` once per job inside one `many_lua` call), so `evalsha`"
        " counts round trips, not appends.",
        "",
    ]
    return "\n".join(lines)


def plots(caps: list[Capacity], rl: Relay, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no plots)")
        return []
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(caps))
    ax.bar([x - 0.27 for x in xs], [c.direct_s for c in caps], 0.27, label="direct asyncio httpx")
    ax.bar(list(xs), [c.aiohttp_s for c in caps], 0.27, label="direct aiohttp")
    ax.bar([x + 0.27 for x in xs], [c.moonq_s for c in caps], 0.27, label="moonq, one node")
    ax.set_xticks(list(xs), [f"N = {c.n:,}" for c in caps])
    ax.set_ylabel("seconds to finish all")
    ax.set_title("N streaming jobs, 3 s upstream latency")
    ax.legend()
    fig.tight_layout()
    cap_png = out / "capacity.png"
    fig.savefig(cap_png, dpi=110)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    paths = [
        ("direct client", rl.direct),
        ("moonq node (event written)", rl.upstream),
        ("moonq subscriber", rl.moonq),
        ("moonq relay (node -> subscriber)", rl.relayed),
    ]
    for label, values in paths:
        ordered = sorted(v * 1000 for v in values)
        ax.plot(ordered, [i / len(ordered) for i in range(len(ordered))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("ms from upstream send")
    ax.set_ylabel("share of fragments")
    ax.set_title(f"Relay latency, {rl.streams} concurrent streams")
    ax.legend()
    fig.tight_layout()
    relay_png = out / "relay.png"
    fig.savefig(relay_png, dpi=110)
    return [cap_png, relay_png]


@contextmanager
def private_redis() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,300,1000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--relay-streams", type=int, default=100)
    parser.add_argument("--overhead-jobs", type=int, default=2000)
    parser.add_argument("--plain-jobs", type=int, default=20)
    parser.add_argument("--small-pool", type=int, default=64, help="MOONQ_CONCURRENCY of the comparison node")
    parser.add_argument("--concurrency", type=int, default=None, help="MOONQ_CONCURRENCY (default: the node's)")
    parser.add_argument("--only", default="capacity,relay,overhead,plain", help="(debugging) parts to run")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    global CONCURRENCY
    CONCURRENCY = args.concurrency
    log_dir = Path(tempfile.mkdtemp(prefix="moonq-perf-"))
    print(f"bench.perf: logs in {log_dir}", flush=True)
    t0 = time.monotonic()
    with private_redis() as url:
        caps, info = capacity(sizes, url, log_dir, args.rounds, args.small_pool)
    with private_redis() as url:
        rl = relay(url, log_dir, args.relay_streams, args.rounds)
    print(
        f"  relay p50/p99: direct {ms(rl.median_pct(2, 0.5))}/{ms(rl.median_pct(2, 0.99))},"
        f" moonq {ms(rl.median_pct(0, 0.5))}/{ms(rl.median_pct(0, 0.99))},"
        f" node->subscriber {ms(rl.median_pct(3, 0.5))}/{ms(rl.median_pct(3, 0.99))}",
        flush=True,
    )
    with private_redis() as url:
        ov = overhead(url, log_dir, args.overhead_jobs, args.rounds)
    print(f"  overhead jobs/s: direct {ov.direct:.0f}, moonq {ov.moonq:.0f}, noop celery {ov.noop:.0f}", flush=True)
    with private_redis() as url:
        plain_direct, plain_s = plain_celery(url, log_dir, args.plain_jobs)
    print(f"  plain celery N={args.plain_jobs}: {plain_s:.1f} s (direct {plain_direct:.1f} s)", flush=True)
    text = section(caps, info, (args.plain_jobs, plain_direct, plain_s), ov, rl, args, time.monotonic() - t0)
    # Plots beside the report: bench/plots for BENCHMARKS.md, <out>-plots/ for a trial run elsewhere.
    plot_dir = Path("bench/plots") if args.out.resolve() == (REPO / "BENCHMARKS.md") else Path(args.out.stem + "-plots")
    pngs = plots(caps, rl, args.out.resolve().parent / plot_dir)
    if pngs:
        text += "\n" + "\n".join(f"![{p.stem}]({plot_dir / p.name})" for p in pngs) + "\n"
    print(text)
    write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
