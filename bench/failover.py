"""Sentinel failover under streaming jobs: how long a kill of the primary stops the fleet, what it loses.

    python -m bench.failover [--kills N] [--jobs J] [--no-write]

Each kill runs on a fresh set: a primary, a replica and three sentinels (``harness.SentinelSet``:
``down-after-milliseconds 1000``, ``failover-timeout 5000``, quorum 2 of 3), one
``celery -A worker worker`` node on ``REDIS_URL=redis+sentinel://...`` (the broker too), and the
simulator streaming 40 one-token chunks 50 ms apart. J jobs are submitted; once all of them stream,
the primary is SIGKILLed. Measured from the kill: when the sentinels name the new primary, and when
the first job event lands on it (a watcher polls the replica's job records every 5 ms; after the
kill nothing replicates to it, so its first change is a node's write). Then every job must end:
completed, failed, lost (JobNotFound: the rewind took its submit) or timed out, and its events are
checked for one clean ending and for retries. The report gives p50 and p99 over the kills.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import redis

from bench.fleets import API_KEY, REPO, clean_env
from bench.report import write_section
from harness import SentinelSet, WorkerProcess
from moonq.errors import JobNotFound, JobTimeout
from moonq.settings import ClientSettings
from producers import Client, JobFailed
from simulator import SimConfig, SimServer

SECTION = "## Sentinel failover"
PASSWORD = "data-pw"
STREAMING = SimConfig(
    seed=16, first_token_latency_s=0.2, chunk_interval_s=0.05, tokens_per_chunk=1, answer_tokens=(40, 40)
)
REQUEST = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Stream through a failover."}]}


def first_change(port: int, keys: list[str], stop: threading.Event, out: list[float]) -> None:
    """Note when any of ``keys``' ``seq`` changes on the server at ``port`` (its first write as primary)."""
    client = redis.Redis(port=port, password=PASSWORD, socket_timeout=1.0)

    def seqs() -> list[bytes | None]:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "seq")
        return pipe.execute()

    baseline = seqs()
    while not stop.is_set():
        try:
            if seqs() != baseline:
                out.append(time.monotonic())
                break
        except (redis.RedisError, OSError):  # it is busy becoming the primary
            pass
        time.sleep(0.005)
    client.close()


def one_kill(sim: SimServer, jobs: int) -> dict[str, float | int]:
    with SentinelSet(password=PASSWORD) as sentinels:
        prefix = f"fo{uuid.uuid4().hex[:6]}"
        url = sentinels.url()
        settings = ClientSettings(redis_url=url, prefix=prefix)
        env = clean_env(
            {
                "REDIS_URL": url,
                "MOONQ_PREFIX": prefix,
                "MOONSHOT_BASE_URL": sim.base_url,
                "MOONSHOT_API_KEY": API_KEY,
                "MOONQ_METRICS_PORT": "0",
            }
        )
        with Client(settings=settings) as client, WorkerProcess(env):
            submitted = [client.submit(REQUEST) for _ in range(jobs)]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if all(client.redis.hget(settings.keys.job(j.id), "seq") not in (None, b"0") for j in submitted):
                    break
                time.sleep(0.05)
            replica = sentinels.replica
            old = sentinels.kill_primary()
            killed = time.monotonic()
            stop, seen = threading.Event(), list[float]()
            watcher = threading.Thread(
                target=first_change, args=(replica.port, [settings.keys.job(j.id) for j in submitted], stop, seen)
            )
            watcher.start()
            sentinels.wait_for_new_primary(old.port)
            promoted = time.monotonic() - killed
            outcomes: Counter[str] = Counter()
            retries = unclean = 0
            for job in submitted:
                try:
                    job.result(timeout=60)
                    outcomes["completed"] += 1
                except JobFailed:
                    outcomes["failed"] += 1
                except JobNotFound:
                    outcomes["lost"] += 1
                    continue
                except JobTimeout:
                    outcomes["timed out"] += 1
                    continue
                events = list(job.events())
                retries += sum(1 for e in events if e.type == "retry")
                unclean += sum(1 for e in events if e.terminal) != 1
            stop.set()
            watcher.join(timeout=5)
    return {
        "promoted_s": promoted,
        "first_event_s": (seen[0] - killed) if seen else float("nan"),
        "retries": retries,
        "unclean": unclean,
        **outcomes,
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    runs = []
    with SimServer(STREAMING) as sim:
        for n in range(args.kills):
            run = one_kill(sim, args.jobs)
            print(f"kill {n + 1}: {run}", flush=True)
            runs.append(run)
    promoted = [float(r["promoted_s"]) for r in runs]
    first = [float(r["first_event_s"]) for r in runs]
    totals: Counter[str] = Counter()
    for r in runs:
        totals.update({k: int(v) for k, v in r.items() if k not in ("promoted_s", "first_event_s")})
    jobs = args.kills * args.jobs
    text = (
        f"{SECTION}\n\n"
        f"`python -m bench.failover --kills {args.kills} --jobs {args.jobs}` (each kill on a fresh primary, replica"
        " and three sentinels, `down-after-milliseconds 1000`, quorum 2 of 3; one node on `redis+sentinel://`, broker"
        f" included; {args.jobs} jobs streaming 40 chunks 50 ms apart when the primary is SIGKILLed).\n\n"
        "| from the kill | p50 | p99 |\n|---|---|---|\n"
        f"| the sentinels name the new primary | {statistics.median(promoted):.2f} s | {pct(promoted, 0.99):.2f} s |\n"
        f"| the first job event lands on it | {statistics.median(first):.2f} s | {pct(first, 0.99):.2f} s |\n\n"
        f"Jobs: {jobs} streaming at the kills; completed {totals['completed']}, failed {totals['failed']},"
        f" lost {totals['lost']}, timed out {totals['timed out']}; {totals['retries']} retries,"
        f" {totals['unclean']} without exactly one terminal event. On loopback the replica is never far"
        " behind; docs/guarantees.md (Sentinel failover) says what a lagging replica can lose.\n"
    )
    if not args.no_write:
        write_section(args.out, SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
