"""Enqueue throughput: ``Client.submit`` one by one vs ``Client.submit_many``, same run, same Redis.

    python -m bench.enqueue [--jobs N] [--rounds R]

Each round enqueues N jobs both ways into a private redis-server (nothing consumes them) and
times it; the report gives the median jobs/s of each and the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from pathlib import Path

from bench.report import write_section
from harness import RedisServer
from moonq.settings import ClientSettings
from producers import Client

SECTION = "## Enqueue throughput: `submit` one by one vs `submit_many`"
REQUEST = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "Summarise this paragraph, please."}]}


def measure(jobs: int, rounds: int) -> dict[str, float]:
    one_by_one, bulk = [], []
    with RedisServer() as server:
        for _ in range(rounds):
            with Client(settings=ClientSettings(redis_url=server.url, prefix=f"b{uuid.uuid4().hex[:6]}")) as client:
                client.submit(REQUEST)  # connections and scripts warmed up outside the timing
                t0 = time.perf_counter()
                for _ in range(jobs):
                    client.submit(REQUEST)
                one_by_one.append(jobs / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                client.submit_many([REQUEST] * jobs)
                bulk.append(jobs / (time.perf_counter() - t0))
    ratios = [b / o for b, o in zip(bulk, one_by_one, strict=True)]
    return {
        "submit_jobs_per_s": statistics.median(one_by_one),
        "submit_many_jobs_per_s": statistics.median(bulk),
        "ratio": statistics.median(ratios),
    }


def section(result: dict[str, float], jobs: int, rounds: int) -> str:
    return "\n".join(
        [
            SECTION,
            "",
            f"`make bench` (step `.venv/bin/python -m bench.enqueue --jobs {jobs} --rounds {rounds}`),"
            f" {time.strftime('%Y-%m-%d')}, machine as above. Each round enqueues {jobs:,} jobs both ways into a"
            " private redis-server (no consumer), the same request.",
            "",
            f"| method | jobs/s (median of {rounds}) |",
            "|---|---|",
            f"| `Client.submit`, one by one | {result['submit_jobs_per_s']:,.0f} |",
            f"| `Client.submit_many` | {result['submit_many_jobs_per_s']:,.0f} |",
            f"| ratio (median of per-round ratios) | {result['ratio']:.1f}x |",
            "",
            "`submit_many` validates everything first, writes the job records in one pipeline and publishes through"
            " kombu's producer batch (one Redis pipeline per 1,000 messages); it also passes a short `argsrepr`,"
            " which skips Celery's repr of the whole prompt (the largest single cost in a profile of the"
            " one-by-one path).",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "BENCHMARKS.md")
    args = parser.parse_args()
    result = measure(args.jobs, args.rounds)
    print(f"enqueue {args.jobs} jobs x {args.rounds} rounds (medians):")
    print(f"  submit one by one : {result['submit_jobs_per_s']:8.0f} jobs/s")
    print(f"  submit_many       : {result['submit_many_jobs_per_s']:8.0f} jobs/s")
    print(f"  ratio             : {result['ratio']:8.1f}x")
    write_section(args.out, SECTION, section(result, args.jobs, args.rounds))


if __name__ == "__main__":
    main()
