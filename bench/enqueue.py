"""Enqueue throughput: ``submit`` one by one and ``submit_many``, with and without idempotency keys.

    python -m bench.enqueue [--jobs N] [--rounds R] [--baseline REV]

Each round enqueues N jobs each way into a private redis-server (nothing consumes them) and times
it, for each producer measured: today's with the broker the data Redis itself (the message is pushed
in the same round trip as the record), today's with the broker a second redis-server (through
Celery and kombu), and, with ``--baseline REV``, ``producers/submitter.py`` as it was at git
revision REV (same broker as the first; no keyed ``submit_many`` before REV had one). The report
gives the median jobs/s of each over the rounds, the producers taking turns within a round.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.report import write_section
from harness import RedisServer
from moonq.settings import ClientSettings
from producers import Client
from producers.client import SubmitItem

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Enqueue throughput: `submit` one by one vs `submit_many`"
REQUEST = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": "Summarise this paragraph, please."}]}
METHODS = ("submit", "submit_keyed", "submit_many", "submit_many_keyed")
LABELS = {
    "submit": "`submit`, one by one",
    "submit_keyed": "`submit` with `idempotency_key`, one by one",
    "submit_many": "`submit_many`",
    "submit_many_keyed": "`submit_many`, each job its own `idempotency_key`",
}


def baseline_submitter(rev: str) -> type:
    """The ``Submitter`` class of ``producers/submitter.py`` at git revision ``rev``."""
    source = subprocess.check_output(["git", "show", f"{rev}:producers/submitter.py"], cwd=REPO, text=True)
    module = types.ModuleType("bench_baseline_submitter")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{rev}:producers/submitter.py", "exec"), module.__dict__)
    return module.Submitter  # type: ignore[no-any-return]


def one_round(client: Client, jobs: int, keyed_many: bool) -> dict[str, float]:
    """jobs/s of each method on ``client`` (each keyed job a fresh key: the cost of a new keyed job)."""
    tag = uuid.uuid4().hex[:8]
    out: dict[str, float] = {}

    def timed(name: str, run: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        run()
        out[name] = jobs / (time.perf_counter() - t0)

    timed("submit", lambda: [client.submit(REQUEST) for _ in range(jobs)])
    timed("submit_keyed", lambda: [client.submit(REQUEST, idempotency_key=f"{tag}-s-{i}") for i in range(jobs)])
    timed("submit_many", lambda: client.submit_many([REQUEST] * jobs))
    if keyed_many:
        items = [SubmitItem(REQUEST, idempotency_key=f"{tag}-m-{i}") for i in range(jobs)]
        timed("submit_many_keyed", lambda: client.submit_many(items))
    return out


@contextlib.contextmanager
def producer(settings: ClientSettings, submitter: type | None) -> Iterator[Client]:
    with Client(settings=settings) as client:
        if submitter is not None:
            client._submitter.close()
            client._submitter = submitter(settings, client.redis)
        client.submit(REQUEST)  # connections and scripts warmed up outside the timing
        client.submit(REQUEST, idempotency_key=uuid.uuid4().hex)
        yield client


def measure(jobs: int, rounds: int, baseline: str | None) -> dict[str, dict[str, float]]:
    """``{producer: {method: median jobs/s}}``."""
    old = baseline_submitter(baseline) if baseline else None
    runs: dict[str, list[dict[str, float]]] = {"now": [], "now_broker_apart": []}
    if old is not None:
        runs["baseline"] = []
    with RedisServer() as server, RedisServer() as broker:
        for _ in range(rounds):
            prefix = f"b{uuid.uuid4().hex[:6]}"
            same = ClientSettings(redis_url=server.url, prefix=prefix)
            apart = ClientSettings(redis_url=server.url, broker_url=broker.url, prefix=prefix)
            if old is not None:
                with producer(same, old) as client:
                    runs["baseline"].append(one_round(client, jobs, keyed_many=False))
            with producer(same, None) as client:
                assert client._submitter._direct is not None
                runs["now"].append(one_round(client, jobs, keyed_many=True))
            with producer(apart, None) as client:
                assert client._submitter._direct is None
                runs["now_broker_apart"].append(one_round(client, jobs, keyed_many=True))
    return {name: {m: statistics.median(r[m] for r in rs) for m in METHODS if m in rs[0]} for name, rs in runs.items()}


def section(result: dict[str, dict[str, float]], jobs: int, rounds: int, baseline: str | None) -> str:
    cmd = f".venv/bin/python -m bench.enqueue --jobs {jobs} --rounds {rounds}" + (
        f" --baseline {baseline}" if baseline else ""
    )
    names = [n for n in ("baseline", "now", "now_broker_apart") if n in result]
    heads = {
        "baseline": f"before (`{baseline}`)",
        "now": "now, broker = data Redis",
        "now_broker_apart": "now, broker apart",
    }

    def cell(name: str, method: str) -> str:
        value = result[name].get(method)
        return "n/a" if value is None else f"{value:,.0f}"

    rows = [f"| {LABELS[m]} | " + " | ".join(cell(n, m) for n in names) + " |" for m in METHODS]
    return "\n".join(
        [
            SECTION,
            "",
            f"`{cmd}`, {time.strftime('%Y-%m-%d')}, machine as above (shared with other work during the run:"
            f" medians of {rounds} rounds). Each round enqueues {jobs:,} jobs each way into a private"
            " redis-server (no consumer), the same request, each keyed job with a fresh key; the producers"
            " take turns within a round. jobs/s, median of the rounds:",
            "",
            "| method | " + " | ".join(heads[n] for n in names) + " |",
            "|---|" + "---|" * len(names),
            *rows,
            "",
            "When the broker is the data Redis (the default: `CELERY_BROKER_URL` unset), a job's message is built"
            " by the producer (what Celery would send, tests/test_bulk.py compares them) and pushed on the"
            " broker's list in one script call with the record (marked `sent`) and its index entries"
            " (`COMMANDS_LUA`, atomic as a MULTI, one reply): one round trip per `submit` (two with a key:"
            " the key's claim first), one per 1,000 jobs for `submit_many`. A broker apart still publishes"
            " through Celery and kombu (a profile of the old path: half the time in `send_task`/kombu's publish,"
            " the rest in four to six Redis round trips). Keyed"
            " `submit_many` claims its keys with one pipelined script per job, then sends only the new jobs.",
            "",
            goals(result["now"]),
            "",
        ]
    )


# What the default path (broker = data Redis) should reach on the benchmark machine, jobs/s.
GOALS = {"submit": 2500.0, "submit_many": 10000.0}


def goals(now: dict[str, float]) -> str:
    """Each goal beside this run's figure, met or not on this machine (the same code missed them on a slower
    machine of the same kind)."""
    parts = [
        f"`{m}` >= {goal:,.0f} jobs/s: {now[m]:,.0f}, {'met' if now[m] >= goal else 'not met'}"
        for m, goal in GOALS.items()
    ]
    return "**Goals**, the default path (broker = data Redis) on this machine: " + "; ".join(parts) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", help="a git revision whose producers/submitter.py to measure beside today's")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    result = measure(args.jobs, args.rounds, args.baseline)
    print(f"enqueue {args.jobs} jobs x {args.rounds} rounds (median jobs/s):")
    for name, figures in result.items():
        print(f"  {name}: " + ", ".join(f"{m} {v:,.0f}" for m, v in figures.items()))
    write_section(args.out, SECTION, section(result, args.jobs, args.rounds, args.baseline))


if __name__ == "__main__":
    main()
