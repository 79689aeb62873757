"""What one job and one relayed fragment cost Redis: commands, command time and CPU.

    python -m bench.redis_cost [--jobs N] [--short F1] [--long F2] [--followers]
                               [--paced-jobs P] [--paced-ms MS] [--no-write]

One ``celery -A worker worker`` node with its defaults on a private redis-server, the simulator in
its own process answering every job with exactly F fragments (one token each, 2 ms apart). Two
runs of N jobs, F1 and F2 fragments each; from each, Redis' own books over the run:
``INFO commandstats`` (calls and microseconds per command; a Lua script's inner commands are
counted too) and ``INFO cpu`` (the redis-server process's user + system CPU, which adds the
network I/O and event loop to the commands' own time). The node's idle traffic (heartbeats, the
broker's blocking pops, the sweeper), measured for 5 s before each run, is subtracted pro rata.

The two runs are solved for cost = per_job + F x per_fragment (two points, one line), so the
per-job figure is a job's fixed cost (submit, claim, limiter, start and end events, acks) and the
per-fragment figure what each relayed delta adds (its append to the replay log and its publish).
With ``--followers``, each job also has a live follower (``Job.events()``) so publishes reach a
subscriber, as in production. docs/scaling.md turns these figures into Redis sizing.

Fragments 2 ms apart fill each of the node's round trips with dozens of appends, which is Redis'
cheapest case. Real answers arrive 20-30 ms apart per stream, and a round trip then carries only
the fragments of the streams that moved since the last one. So the same two runs are made again
with P jobs whose fragments come MS ms apart (``--paced-jobs``, ``--paced-ms``; P streams at once,
the realistic case), and their per-fragment figure is the one to size Redis with; 0 skips them.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.fleets import REPO, node_env
from bench.perf import Sim
from bench.report import machine_line, write_section
from harness import RedisServer, WorkerProcess
from moonq.settings import ClientSettings
from producers import Client

SECTION = "## Redis cost per job and per relayed fragment"
IDLE_S = 5.0
REQUEST = {"model": "moonshot-v1-8k", "messages": [{"role": "user", "content": "Count to many."}]}


@dataclass
class Books:
    calls: dict[str, int]
    usec: dict[str, int]
    cpu_s: float
    at: float

    @classmethod
    def read(cls, r: redis.Redis) -> Books:
        stats = r.info("commandstats")
        cpu = r.info("cpu")
        return cls(
            {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()},
            {k.removeprefix("cmdstat_"): int(v["usec"]) for k, v in stats.items()},
            float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            time.monotonic(),
        )


@dataclass
class Cost:
    commands: float
    command_us: float
    cpu_us: float
    top: dict[str, float]


def spent(after: Books, before: Books, idle: Cost, jobs: int) -> Cost:
    """Per job, idle traffic subtracted (``idle`` is per second)."""
    took = after.at - before.at
    calls = {k: after.calls[k] - before.calls.get(k, 0) for k in after.calls}
    usec = {k: after.usec[k] - before.usec.get(k, 0) for k in after.usec}
    top = {k: v / jobs for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:6] if v > 0}
    return Cost(
        (sum(calls.values()) - idle.commands * took) / jobs,
        (sum(usec.values()) - idle.command_us * took) / jobs,
        ((after.cpu_s - before.cpu_s) * 1e6 - idle.cpu_us * took) / jobs,
        top,
    )


def one_run(fragments: int, jobs: int, followers: bool, chunk_ms: float = 2) -> Cost:
    with (
        RedisServer() as server,
        Sim(latency_ms=20, chunk_ms=chunk_ms, answer=(fragments, fragments), per_chunk=1) as sim,
    ):
        prefix = f"rc{uuid.uuid4().hex[:6]}"
        env = node_env(server.url, sim.base_url, prefix)
        r = redis.Redis.from_url(server.url)
        with WorkerProcess(env), Client(settings=ClientSettings(redis_url=server.url, prefix=prefix)) as client:
            client.submit(REQUEST).result(timeout=60)  # warm: scripts loaded, connections open
            time.sleep(1.0)
            before_idle = Books.read(r)
            time.sleep(IDLE_S)
            after_idle = Books.read(r)
            idle = spent(after_idle, before_idle, Cost(0, 0, 0, {}), 1)
            idle = Cost(idle.commands / IDLE_S, idle.command_us / IDLE_S, idle.cpu_us / IDLE_S, {})
            before = Books.read(r)
            submitted = client.submit_many([REQUEST] * jobs)
            threads = []
            if followers:
                for job in submitted:
                    t = threading.Thread(target=lambda j=job: list(j.events()), daemon=True)
                    t.start()
                    threads.append(t)
            for job in submitted:
                job.result(timeout=300)
            for t in threads:
                t.join(timeout=60)
            after = Books.read(r)
        r.close()
        return spent(after, before, idle, jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--short", type=int, default=10, help="F1: fragments per job in the first run")
    parser.add_argument("--long", type=int, default=200, help="F2: fragments per job in the second run")
    parser.add_argument("--followers", action="store_true", help="a live follower per job")
    parser.add_argument("--paced-jobs", type=int, default=100, help="P: jobs of the paced runs (0: none)")
    parser.add_argument("--paced-ms", type=float, default=20.0, help="MS: fragment spacing of the paced runs")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    rows = []
    costs = {}
    # (label, jobs, fragment spacing in ms, followers)
    runs = [
        (f"fragments 2 ms apart, {args.jobs} jobs", args.jobs, 2.0, False),
        *([(f"fragments 2 ms apart, {args.jobs} jobs", args.jobs, 2.0, True)] if args.followers else []),
        *(
            [
                (
                    f"paced: fragments {args.paced_ms:g} ms apart, {args.paced_jobs} streams",
                    args.paced_jobs,
                    args.paced_ms,
                    True,
                )
            ]
            if args.paced_jobs
            else []
        ),
    ]
    for run_label, jobs, chunk_ms, followers in runs:
        a = one_run(args.short, jobs, followers, chunk_ms)
        b = one_run(args.long, jobs, followers, chunk_ms)
        span = args.long - args.short
        frag = Cost(
            (b.commands - a.commands) / span, (b.command_us - a.command_us) / span, (b.cpu_us - a.cpu_us) / span, {}
        )
        job = Cost(
            a.commands - args.short * frag.commands,
            a.command_us - args.short * frag.command_us,
            a.cpu_us - args.short * frag.cpu_us,
            {},
        )
        label = f"{run_label}, " + ("a live follower per job" if followers else "no subscriber")
        costs[label] = (job, frag, a, b)
        rows.append(
            f"| per job ({label}) | {job.commands:.1f} | {job.command_us:.0f} | {job.cpu_us:.0f} |\n"
            f"| per fragment ({label}) | {frag.commands:.2f} | {frag.command_us:.1f} | {frag.cpu_us:.1f} |"
        )
        for name, c in ((f"F = {args.short}", a), (f"F = {args.long}", b)):
            top = ", ".join(f"{k} {v:.1f}" for k, v in c.top.items())
            print(f"{label}, {name}: {c.commands:.1f} commands/job, {c.cpu_us:.0f} us CPU/job; top: {top}", flush=True)
    table = "\n".join(
        [
            "| | Redis commands | Redis command time (us) | Redis CPU (us) |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    tops = []
    for label, (_, _, _, b) in costs.items():
        tops.append(
            f"- {label}, F = {args.long}, commands per job by name: "
            + ", ".join(f"`{k}` {v:.1f}" for k, v in b.top.items())
        )
    text = (
        f"{SECTION}\n\n"
        f"`python -m bench.redis_cost --jobs {args.jobs} --short {args.short} --long {args.long}"
        f"{' --followers' if args.followers else ''} --paced-jobs {args.paced_jobs} --paced-ms {args.paced_ms:g}`"
        f" (`make bench-redis-cost`), {time.strftime('%Y-%m-%d')}; machine: {machine_line()}. One node with its"
        " defaults, the simulator in its own process answering F one-token fragments (F ="
        f" {args.short} and F = {args.long}, all jobs submitted at once); Redis' `INFO commandstats` and `INFO cpu`"
        " over each run, the node's idle traffic subtracted; per job and per fragment solved from the two runs."
        "\n\n" + table + "\n\n" + "\n".join(tops) + "\n\n"
        "Command time is what Redis spent executing commands (a script's inner commands included); CPU is the"
        " redis-server process's, which adds reading and writing the sockets. A relayed fragment is one"
        " event appended to the job's replay log and published on its channel; the node sends the fragments"
        " that wait together in one script call, so with fragments 2 ms apart a call carries dozens and with"
        f" paced streams ({args.paced_ms:g} ms apart, as real answers arrive) a few: the paced per-fragment"
        " figure is the one to size with. docs/scaling.md turns these into Redis sizing per Moonshot tier.\n"
    )
    if not args.no_write:
        write_section(args.out, SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
