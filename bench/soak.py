"""Soak: a few thousand jobs with upstream faults through one node; does memory come back?

    python -m bench.soak [--jobs 3000] [--waves 3] [--fault-rate 0.2] [--ttl 60]

One ``celery -A worker worker`` node (its defaults, plus a short ``MOONQ_RESULT_TTL_S`` so that
expiry can be watched within the run, and short retry delays) on a private redis-server, against
the simulator in its own process drawing a random fault for ``--fault-rate`` of the requests. The
jobs go in as ``--waves`` equal waves, each submitted at once and drained before the next; 2% end
failed (a quota error, final), 1% are cancelled right after submit, 5% are submitted twice under an
idempotency key. Redis ``used_memory`` and key count, and the node's RSS and threads, are sampled
every 0.25 s: at the start (node up, idle, no job yet), at the peak, after each wave, and at the end,
once every job key has expired. Results go to BENCHMARKS.md (section "Soak") and the samples to
``.bench/soak/samples.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import redis

from bench.fleets import API_KEY, clean_env
from bench.perf import Sim, status_kib
from bench.report import write_section
from harness import RedisServer, WorkerProcess, free_port
from moonq.settings import ClientSettings
from moonq.wire import TERMINAL_STATUSES
from producers import Client, Job

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Soak: Redis and node memory over thousands of jobs with upstream faults"
PREFIX = "soak"
MODEL = "moonshot-v1-8k"
# Job-scoped key families: all of them must be gone once the run's TTL has passed.
JOB_KEYS = ("job:*", "log:*", "idem:*", "failed")
SAMPLE_S = 0.25
# Redis counts as back at its start when within this much (allocator and script caches, client buffers).
REDIS_SLACK = 0.10
REDIS_SLACK_BYTES = 512 * 1024
# Bytes of one hdr latency histogram that Redis 7 keeps per command name (measured on 7.0: 24.7 KB).
HISTOGRAM_KIB = 24
# The node's RSS counts as flat from one wave to the next within this much (allocator noise).
NODE_SLACK = 0.02
NODE_SLACK_KIB = 2048


@dataclass
class Sample:
    t: float
    redis_used: int
    redis_dataset: int  # used_memory_dataset: the keys' data, without client buffers and caches
    redis_clients: int  # connected clients
    redis_keys: int
    node_rss_kib: int
    node_threads: int


@dataclass
class Wave:
    jobs: int
    seconds: float
    outcomes: dict[str, int]
    attempts: int


@dataclass
class Soak:
    start: Sample
    after_waves: list[Sample]
    end: Sample
    stopped: Sample  # Redis once the node has stopped (its connections closed)
    end_keys: list[str]  # every key left at the end
    new_histograms: int  # command names Redis began a latency histogram for after the start (INFO latencystats)
    peak_redis: Sample
    peak_rss: Sample
    waves: list[Wave]
    expired_after_s: float | None
    total_s: float
    samples: list[Sample] = field(default_factory=list)


class Sampler:
    """Samples Redis memory and the node's RSS every ``SAMPLE_S`` in a thread."""

    def __init__(self, r: redis.Redis, pid: int) -> None:
        self.r, self.pid, self.t0 = r, pid, time.monotonic()
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> Sample:
        info = self.r.info("memory")
        return Sample(
            round(time.monotonic() - self.t0, 2),
            int(info["used_memory"]),
            int(info["used_memory_dataset"]),
            int(self.r.info("clients")["connected_clients"]),
            int(self.r.dbsize()),
            status_kib(self.pid, "VmRSS"),
            status_kib(self.pid, "Threads"),
        )

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.samples.append(self.now())

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def body(i: int) -> dict[str, Any]:
    req: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": f"Soak {i}: what is a queue?"}]}
    if i % 50 == 0:
        req["sim"] = {"fault": "quota"}  # final: a dead letter
    return req


def submit_wave(client: Client, first: int, n: int) -> list[Job]:
    """n jobs: most with one ``submit_many``, 5% twice under an idempotency key, 1% cancelled at once."""
    numbers = range(first, first + n)
    keyed = [i for i in numbers if i % 20 == 2]
    jobs = client.submit_many([body(i) for i in numbers if i % 20 != 2])
    for i in keyed:
        job = client.submit(body(i), idempotency_key=f"soak-{i}")
        assert client.submit(body(i), idempotency_key=f"soak-{i}").id == job.id
        jobs.append(job)
    for job in jobs[1::100]:
        job.cancel()
    return jobs


def drain(client: Client, jobs: list[Job], timeout_s: float) -> tuple[dict[str, int], int]:
    """Wait until every job has ended; returns the outcomes and the attempts they took."""
    pending = {job.id for job in jobs}
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        time.sleep(1.0)
        ids = list(pending)
        with client.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(client.keys.job(job_id), "status")
            statuses = pipe.execute()
        pending -= {job_id for job_id, s in zip(ids, statuses, strict=True) if s and s.decode() in TERMINAL_STATUSES}
    with client.redis.pipeline(transaction=False) as pipe:
        for job in jobs:
            pipe.hmget(client.keys.job(job.id), "status", "attempt")
        rows = pipe.execute()
    outcomes: dict[str, int] = {}
    for status, _ in rows:
        name = status.decode() if status else "missing"
        outcomes[name] = outcomes.get(name, 0) + 1
    outcomes["unfinished"] = len(pending)
    return outcomes, sum(int(attempt or 0) for _, attempt in rows)


def job_keys_left(r: redis.Redis) -> int:
    return sum(1 for pattern in JOB_KEYS for _ in r.scan_iter(match=f"{PREFIX}:{pattern}", count=1000))


def run(args: argparse.Namespace, workdir: Path) -> Soak:
    t0 = time.monotonic()
    sim = Sim(latency_ms=args.latency_ms, chunk_ms=args.chunk_ms, answer=(20, 60), per_chunk=2)
    sim.cmd += ["--fault-rate", str(args.fault_rate)]
    with RedisServer() as server, sim:
        env = {
            "REDIS_URL": server.url,
            "MOONQ_PREFIX": PREFIX,
            "MOONSHOT_BASE_URL": sim.base_url,
            "MOONSHOT_API_KEY": API_KEY,
            "MOONQ_METRICS_PORT": str(free_port()),
            "MOONQ_METRICS_HOST": "127.0.0.1",
            "MOONQ_RESULT_TTL_S": str(args.ttl),
            # Short retry delays, so that 20% faults cost seconds, not minutes; the work done is the same.
            "MOONQ_BACKOFF_BASE_S": "0.05",
            "MOONQ_MAX_RETRY_DELAY_S": "1",
            "MOONQ_MAX_RETRY_AFTER_S": "0.5",
        }
        node = WorkerProcess(env, log_path=workdir / "node.log")
        node.env = clean_env(env)
        r = redis.Redis.from_url(server.url)
        # The producer writes records and idempotency keys too: it takes the same TTL as the node.
        producer = ClientSettings(redis_url=server.url, prefix=PREFIX, result_ttl_s=args.ttl)
        with node, Client(settings=producer) as client:
            assert node.proc is not None
            sampler = Sampler(r, node.proc.pid)
            time.sleep(2.0)  # the node settles (first heartbeat, exporter up)
            start = sampler.now()
            histograms = len(r.info("latencystats"))
            waves, after = [], []
            per_wave = args.jobs // args.waves
            with sampler:
                for w in range(args.waves):
                    w0 = time.monotonic()
                    jobs = submit_wave(client, w * per_wave, per_wave)
                    outcomes, attempts = drain(client, jobs, timeout_s=args.wave_timeout)
                    waves.append(Wave(len(jobs), time.monotonic() - w0, outcomes, attempts))
                    print(f"wave {w + 1}: {len(jobs):,} jobs in {waves[-1].seconds:.0f} s, {outcomes}", flush=True)
                    time.sleep(2.0)  # in-flight bookkeeping (acks, heartbeats) settles
                    after.append(sampler.now())
                e0 = time.monotonic()
                expired_after: float | None = None
                while time.monotonic() - e0 < args.ttl + 90:
                    if job_keys_left(r) == 0:
                        expired_after = time.monotonic() - e0
                        break
                    time.sleep(2.0)
                time.sleep(2.0)
                end = sampler.now()
                end_keys = sorted(k.decode(errors="replace").removeprefix(f"{PREFIX}:") for k in r.scan_iter())
                histograms = len(r.info("latencystats")) - histograms
            samples = [start, *sampler.samples, *after, end]
        time.sleep(1.0)
        stopped = replace(sampler.now(), node_rss_kib=0, node_threads=0)
        r.close()
    return Soak(
        start=start,
        after_waves=after,
        end=end,
        stopped=stopped,
        end_keys=end_keys,
        new_histograms=histograms,
        peak_redis=max(samples, key=lambda s: s.redis_used),
        peak_rss=max(samples, key=lambda s: s.node_rss_kib),
        waves=waves,
        expired_after_s=expired_after,
        total_s=time.monotonic() - t0,
        samples=sampler.samples,
    )


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def redis_back(s: Soak) -> bool:
    return s.end.redis_used <= s.start.redis_used * (1 + REDIS_SLACK) + REDIS_SLACK_BYTES


def section(s: Soak, args: argparse.Namespace, cmd: str) -> str:
    jobs = sum(w.jobs for w in s.waves)
    outcomes: dict[str, int] = {}
    for w in s.waves:
        for k, v in w.outcomes.items():
            outcomes[k] = outcomes.get(k, 0) + v
    attempts = sum(w.attempts for w in s.waves)
    rows = [
        ("start: node up and idle, no job yet", s.start),
        ("peak Redis memory", s.peak_redis),
        ("peak node RSS", s.peak_rss),
    ]
    rows += [(f"after wave {i + 1} (its jobs ended)", a) for i, a in enumerate(s.after_waves)]
    expiry = f"{s.expired_after_s:.0f} s after the last job ended" if s.expired_after_s is not None else "timed out"
    rows += [(f"end: every job key expired ({expiry}), +2 s", s.end), ("the node stopped", s.stopped)]
    lines = [
        SECTION,
        "",
        f"`{cmd}`, {time.strftime('%Y-%m-%d')}; the whole run took {s.total_s:.0f} s. Machine as above.",
        "",
        f"**Setup.** One `celery -A worker worker` node with its defaults on a private redis-server, except"
        f" `MOONQ_RESULT_TTL_S={args.ttl}` (for the producer too; the default keeps records a day, a short TTL lets"
        " the run watch them expire) and short retry delays (`MOONQ_BACKOFF_BASE_S=0.05`,"
        " `MOONQ_MAX_RETRY_DELAY_S=1`, `MOONQ_MAX_RETRY_AFTER_S=0.5`; the simulator's 429s ask for 1 s). The"
        f" simulator (its own process) takes {args.latency_ms:.0f} ms to the first token, then 20-60 tokens"
        f" {args.chunk_ms:.0f} ms apart, and gives {args.fault_rate:.0%} of requests a random fault (overload, rate"
        f" limit, 500, 503, a dropped connection, a truncated or corrupt stream). {jobs:,} jobs in {len(s.waves)}"
        " waves, each submitted at once and drained before the next: 2% fail for good (quota error, a dead"
        " letter), 1% are cancelled right after submit, 5% are submitted twice under an idempotency key. Outcomes: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(outcomes.items()) if v)
        + f"; {attempts:,} attempts ({attempts / max(jobs, 1):.2f} a job). Redis `used_memory` (and"
        " `used_memory_dataset`), keys and clients, and the node's RSS and threads, are sampled every"
        f" {SAMPLE_S} s.",
        "",
        "| moment | Redis used_memory | of which data | Redis keys | Redis clients | node RSS | node threads | t |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {mib(x.redis_used)} | {mib(x.redis_dataset)} | {x.redis_keys:,} | {x.redis_clients} |"
            + (f" {x.node_rss_kib / 1024:.1f} MiB | {x.node_threads:,} |" if x.node_rss_kib else " - | - |")
            + f" {x.t:.0f} s |"
            for name, x in rows
        ),
        "",
        redis_verdict(s),
        "",
        node_verdict(s),
        "",
    ]
    return "\n".join(lines)


def redis_verdict(s: Soak) -> str:
    delta = s.end.redis_used - s.start.redis_used
    head = "**Redis comes back.**" if redis_back(s) else "**Redis did not come back.**"
    return (
        f"{head} From a peak of {mib(s.peak_redis.redis_used)} and {s.peak_redis.redis_keys:,} keys to"
        f" {mib(s.end.redis_used)} and {s.end.redis_keys} keys once the jobs' keys expired, against"
        f" {mib(s.start.redis_used)} and {s.start.redis_keys} at the start ({delta / 1024:+.0f} KiB). Left at the"
        f" end: {', '.join(f'`{k}`' for k in s.end_keys)} (kombu's routing tables, and the node list, which has an"
        " hour's TTL). The difference is a fixed cost, not a per-job one: Redis 7 allocates a latency histogram"
        f" (~{HISTOGRAM_KIB} KiB) for each command name the first time it runs (`latency-tracking`; here"
        f" {s.new_histograms} names were first used after the start, ~{s.new_histograms * HISTOGRAM_KIB} KiB), and"
        " the node holds"
        f" {s.end.redis_clients} connections against {s.start.redis_clients} at the start (its Redis pool keeps up to"
        f" 50 open); once the node stopped, Redis was at {mib(s.stopped.redis_used)}."
    )


def node_verdict(s: Soak) -> str:
    rss = [a.node_rss_kib for a in s.after_waves]
    steps = [b - a for a, b in itertools.pairwise(rss)]
    flat = not steps or steps[-1] <= max(NODE_SLACK * rss[-2], NODE_SLACK_KIB)
    threads = {a.node_threads for a in s.after_waves}
    return (
        f"**The node** rose from {s.start.node_rss_kib / 1024:.1f} MiB idle to a peak of"
        f" {s.peak_rss.node_rss_kib / 1024:.1f} MiB ({s.peak_rss.node_threads:,} threads) and ended at"
        f" {s.end.node_rss_kib / 1024:.1f} MiB. It does not return to the idle figure: CPython and glibc keep freed"
        " memory for reuse, and Celery's thread pool keeps the threads it started at the peak"
        f" ({'/'.join(f'{t:,}' for t in sorted(threads))} after the waves). What matters is whether it keeps"
        " growing: after each wave it stood at "
        + ", ".join(f"{k / 1024:.1f}" for k in rss)
        + " MiB"
        + (f" (steps of {', '.join(f'{d / 1024:+.1f}' for d in steps)} MiB)" if steps else "")
        + (
            ": the steps stay within the allocator's noise (2% or 2 MiB), no sign of per-job growth."
            if flat
            else ": still growing with the jobs, look for a leak."
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--ttl", type=int, default=60, help="MOONQ_RESULT_TTL_S of the run (at least 60)")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--chunk-ms", type=float, default=5.0)
    parser.add_argument("--wave-timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    workdir = REPO / ".bench" / "soak"
    workdir.mkdir(parents=True, exist_ok=True)
    result = run(args, workdir)
    (workdir / "samples.json").write_text(json.dumps([asdict(x) for x in result.samples]))
    cmd = ".venv/bin/python -m bench.soak" + (
        f" --jobs {args.jobs} --waves {args.waves} --fault-rate {args.fault_rate} --ttl {args.ttl}"
        if (args.jobs, args.waves, args.fault_rate, args.ttl) != (3000, 3, 0.2, 60)
        else ""
    )
    text = section(result, args, cmd)
    print(text)
    write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
