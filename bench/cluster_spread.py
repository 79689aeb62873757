"""How moonq's Redis load spreads over the primaries of a Redis Cluster, against one plain Redis.

    python -m bench.cluster_spread [--jobs N] [--fragments F] [--rounds K] [--no-write]

Each round starts a fresh three-primary cluster (``harness.processes.ClusterSet``) for the data
plane, a plain redis-server as the Celery broker, one ``celery -A worker worker`` node with its
defaults and the simulator in its own process answering every job with exactly F one-token
fragments, 2 ms apart. N jobs go in with ``submit_many``, each with a live follower
(``Job.events()`` in a thread). Every primary's and the broker's books (``INFO commandstats``:
calls, a script's inner commands included, and their microseconds; ``INFO cpu``) are read before
and after, the node's idle traffic on each (measured for 5 s first) subtracted, as in
bench/redis_cost.py. Per primary: its share of the cluster's commands, command time and CPU, and
its share of the jobs (the slot of a job's keys is its group's). The primary serving the
limiter's slot (``{limit}``) carries the limiter's scripts besides its jobs; its share above its
jobs' share is reported as the limiter's extra.

In the same round, the same N jobs x F fragments on ONE plain Redis holding data and broker
(``bench.redis_cost.one_run`` with followers), for the commands per job a cluster adds or saves.
Figures are medians over K rounds.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from bench.fleets import API_KEY, REPO, clean_env
from bench.perf import Sim
from bench.redis_cost import REQUEST, Books, Cost, one_run, spent
from bench.report import write_section
from harness import RedisServer, WorkerProcess
from harness.processes import ClusterSet
from moonq.keys import GROUP_TAGS, Keys
from moonq.settings import ClientSettings
from producers import Client
from worker.limiter_state import LimiterKeys

SECTION = "## Redis Cluster: how the load spreads over shards"
IDLE_S = 5.0
# Commands only a cluster client sends: slot maps, and the keys of a command it cannot place itself.
CLUSTER_ONLY = ("cluster", "command", "readonly", "asking")


@dataclass
class Shard:
    """One primary over a run: its slots, what it cost per job of the run, the jobs and groups it holds."""

    slots: str
    cost: Cost
    jobs: int
    groups: int
    limiter: bool


@dataclass
class Round:
    shards: list[Shard]
    broker: Cost
    single: Cost
    cluster_only: dict[str, float]
    lost: tuple[Counter[str], Counter[str]]  # followers that died of an exception: cluster run, one Redis


def slot_owners(port: int) -> list[tuple[int, int, int]]:
    """(first slot, last slot, primary's port) for every slot range, as the node on ``port`` sees it."""
    r = redis.Redis(port=port)
    try:
        raw: Any = r.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
    finally:
        r.close()
    # The server's reply: [first, last, [host, port, id] of the primary, then its replicas'] per range.
    return sorted((int(entry[0]), int(entry[1]), int(entry[2][1])) for entry in raw)


def owner_of(slot: int, owners: list[tuple[int, int, int]]) -> int:
    return next(port for first, last, port in owners if first <= slot <= last)


def idle_rate(before: Books, after: Books) -> Cost:
    """A server's idle traffic per second, between two reads of its books."""
    took = after.at - before.at
    per = spent(after, before, Cost(0, 0, 0, {}), 1)
    return Cost(per.commands / took, per.command_us / took, per.cpu_us / took, {})


def cluster_only(after: Books, before: Books, idle_after: Books, idle_before: Books, jobs: int) -> dict[str, float]:
    """Per job, idle traffic subtracted: the commands of ``CLUSTER_ONLY`` a primary served, by name."""
    took, idle_took = after.at - before.at, idle_after.at - idle_before.at
    out = {}
    for name, calls in after.calls.items():
        if name.split("|")[0] in CLUSTER_ONLY:
            idle = (idle_after.calls.get(name, 0) - idle_before.calls.get(name, 0)) / idle_took
            out[name] = (calls - before.calls.get(name, 0) - idle * took) / jobs
    return out


def cluster_run(fragments: int, jobs: int) -> tuple[list[Shard], Cost, dict[str, float]]:
    """One node on a fresh cluster (and broker): each primary's cost per job, the broker's, and the
    cluster-only commands per job (all primaries)."""
    with (
        ClusterSet() as cluster,
        RedisServer() as broker,
        Sim(latency_ms=20, chunk_ms=2, answer=(fragments, fragments), per_chunk=1) as sim,
    ):
        prefix = f"cs{uuid.uuid4().hex[:6]}"
        env = clean_env(
            {
                "REDIS_URL": cluster.url,
                "CELERY_BROKER_URL": broker.url,
                "MOONQ_PREFIX": prefix,
                "MOONSHOT_BASE_URL": sim.base_url,
                "MOONSHOT_API_KEY": API_KEY,
                "MOONQ_METRICS_PORT": "0",
            }
        )
        owners = slot_owners(cluster.ports[0])
        primaries = [port for _, _, port in owners]
        servers = [redis.Redis(port=port) for port in primaries] + [redis.Redis.from_url(broker.url)]
        settings = ClientSettings(redis_url=cluster.url, broker_url=broker.url, prefix=prefix)
        try:
            with WorkerProcess(env), Client(settings=settings) as client:
                client.submit(REQUEST).result(timeout=60)  # warm: scripts loaded on every primary, pools open
                time.sleep(1.0)
                before_idle = [Books.read(r) for r in servers]
                time.sleep(IDLE_S)
                after_idle = [Books.read(r) for r in servers]
                idle = [idle_rate(b, a) for b, a in zip(before_idle, after_idle, strict=True)]
                before = [Books.read(r) for r in servers]
                submitted = client.submit_many([REQUEST] * jobs)
                threads = []
                for job in submitted:
                    t = threading.Thread(target=lambda j=job: list(j.events()), daemon=True)
                    t.start()
                    threads.append(t)
                for job in submitted:
                    job.result(timeout=300)
                for t in threads:
                    t.join(timeout=60)
                after = [Books.read(r) for r in servers]
        finally:
            for r in servers:
                r.close()
    costs = [spent(a, b, i, jobs) for a, b, i in zip(after, before, idle, strict=True)]
    keys = Keys(prefix)
    held = [owner_of(key_slot(keys.job(job.id).encode()), owners) for job in submitted]
    tags = [owner_of(key_slot(f"{{{tag}}}".encode()), owners) for tag in GROUP_TAGS]
    limiter = owner_of(key_slot(LimiterKeys.for_prefix(prefix).root.encode()), owners)
    shards = [
        Shard(f"{first}-{last}", cost, held.count(port), tags.count(port), port == limiter)
        for (first, last, port), cost in zip(owners, costs[:-1], strict=True)
    ]
    only: dict[str, float] = {}
    for i in range(len(primaries)):
        for name, n in cluster_only(after[i], before[i], after_idle[i], before_idle[i], jobs).items():
            only[name] = only.get(name, 0.0) + n
    return shards, costs[-1], only


@contextmanager
def lost_followers() -> Iterator[Counter[str]]:
    """Counts the threads that die of an exception meanwhile, by exception type.

    A follower that fails leaves its job without a subscriber, which changes what is measured; the
    count goes into the report rather than the figures passing as if every job had had one.
    """
    lost: Counter[str] = Counter()
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        lost[args.exc_type.__name__] += 1

    threading.excepthook = hook
    try:
        yield lost
    finally:
        threading.excepthook = previous


def share(shards: list[Shard], figure: Callable[[Cost], float]) -> list[float]:
    total = sum(figure(s.cost) for s in shards)
    return [figure(s.cost) / total for s in shards]


def total(shards: list[Shard], figure: Callable[[Cost], float]) -> float:
    return sum(figure(s.cost) for s in shards)


def commands(c: Cost) -> float:
    return c.commands


def command_us(c: Cost) -> float:
    return c.command_us


def cpu_us(c: Cost) -> float:
    return c.cpu_us


FIGURES = (commands, command_us, cpu_us)


def one_round(fragments: int, jobs: int, index: int) -> Round:
    with lost_followers() as lost_cluster:
        shards, broker, only = cluster_run(fragments, jobs)
    with lost_followers() as lost_single:
        single = one_run(fragments, jobs, True)
    n = sum(s.jobs for s in shards)
    for s, shares in zip(shards, zip(*(share(shards, f) for f in FIGURES), strict=True), strict=True):
        top = ", ".join(f"{k} {v:.1f}" for k, v in s.cost.top.items())
        print(
            f"round {index}: slots {s.slots}{' {limit}' if s.limiter else ''}: jobs {s.jobs / n:.1%},"
            f" commands {shares[0]:.1%}, command time {shares[1]:.1%}, CPU {shares[2]:.1%}; top per job: {top}",
            flush=True,
        )
    print(
        f"round {index}: commands per job: cluster {total(shards, commands):.1f}, broker {broker.commands:.1f},"
        f" one Redis {single.commands:.1f}; cluster-only: "
        + ", ".join(f"{k} {v:.2f}" for k, v in sorted(only.items(), key=lambda kv: -kv[1]))
        + f"; followers lost: cluster {dict(lost_cluster)}, one Redis {dict(lost_single)}",
        flush=True,
    )
    return Round(shards, broker, single, only, (lost_cluster, lost_single))


def med(values: list[float]) -> float:
    return statistics.median(values)


def section(rounds: list[Round], args: argparse.Namespace, took_s: float) -> str:
    f = args.fragments
    first = rounds[0].shards
    rows = []
    for i, s in enumerate(first):
        jobs = med([r.shards[i].jobs / sum(x.jobs for x in r.shards) for r in rounds])
        shares = [med([share(r.shards, fig)[i] for r in rounds]) for fig in FIGURES]
        label = f"slots {s.slots}" + (" + `{limit}`" if s.limiter else "")
        rows.append(f"| {label} | {s.groups} | {jobs:.1%} | {shares[0]:.1%} | {shares[1]:.1%} | {shares[2]:.1%} |")
    lim = next(i for i, s in enumerate(first) if s.limiter)
    extra = [
        med([share(r.shards, fig)[lim] - r.shards[lim].jobs / sum(x.jobs for x in r.shards) for r in rounds])
        for fig in FIGURES
    ]
    extra_cmds = med(
        [
            (share(r.shards, commands)[lim] - r.shards[lim].jobs / sum(x.jobs for x in r.shards))
            * total(r.shards, commands)
            for r in rounds
        ]
    )
    cluster = [med([total(r.shards, fig) for r in rounds]) for fig in FIGURES]
    broker = [med([fig(r.broker) for r in rounds]) for fig in FIGURES]
    single = [med([fig(r.single) for r in rounds]) for fig in FIGURES]
    both = med([total(r.shards, commands) + r.broker.commands for r in rounds])
    ratio = med([(total(r.shards, commands) + r.broker.commands) / r.single.commands for r in rounds])
    spread = [
        "| primary | groups | jobs | commands | command time | CPU |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    totals = [
        "| per job | Redis commands | commands / F | command time (us) | CPU (us) |",
        "|---|---|---|---|---|",
        f"| cluster, 3 primaries (data plane) | {cluster[0]:.1f} | {cluster[0] / f:.2f} | {cluster[1]:.0f}"
        f" | {cluster[2]:.0f} |",
        f"| its broker (plain Redis) | {broker[0]:.1f} | {broker[0] / f:.2f} | {broker[1]:.0f} | {broker[2]:.0f} |",
        f"| one plain Redis (data + broker) | {single[0]:.1f} | {single[0] / f:.2f} | {single[1]:.0f}"
        f" | {single[2]:.0f} |",
    ]
    command_shares = [med([share(r.shards, commands)[i] for r in rounds]) for i in range(len(first))]
    job_shares = [med([r.shards[i].jobs / sum(x.jobs for x in r.shards) for r in rounds]) for i in range(len(first))]
    others = [i for i in range(len(first)) if i != lim]
    names = sorted({k for r in rounds for k in r.cluster_only})
    only = {k: med([r.cluster_only.get(k, 0.0) for r in rounds]) for k in names}
    lost = [sum((r.lost[i] for r in rounds), Counter()) for i in (0, 1)]
    lost_text = (
        "Every follower ran to its job's end."
        if not any(lost)
        else "Followers that died of an error (all rounds), leaving their jobs without a subscriber: "
        + "; ".join(
            f"{where} {sum(c.values())} ({', '.join(f'`{k}` {n}' for k, n in c.items())})"
            for where, c in zip(("on the cluster", "on one Redis"), lost, strict=True)
            if c
        )
        + f", of {args.jobs * args.rounds} per side."
    )
    rounds_text = f"Medians of {args.rounds} rounds" if args.rounds > 1 else "One round"
    only_text = ", ".join(f"`{k}` {v:.2f}" for k, v in sorted(only.items(), key=lambda kv: -kv[1]) if v >= 0.01)
    return (
        f"{SECTION}\n\n"
        f"`.venv/bin/python -m bench.cluster_spread --jobs {args.jobs} --fragments {f} --rounds {args.rounds}`,"
        f" {time.strftime('%Y-%m-%d', time.gmtime())}; the whole run took {took_s:.0f} s. Machine as above."
        f" Each round: a fresh Redis Cluster of three primaries (no replicas) for the data plane and a plain"
        f" redis-server as the Celery broker, one node with its defaults, the simulator in its own process"
        f" answering {f} one-token fragments 2 ms apart; {args.jobs} jobs with `submit_many`, each with a live"
        f" follower. Every primary's `INFO commandstats` (a script's inner commands included) and `INFO cpu` over"
        f" the run, the node's idle traffic on each subtracted (as in bench/redis_cost.py); then the same jobs on"
        f" one plain Redis holding data and broker. {rounds_text}.\n\n"
        "Shares of the cluster's load per primary (groups: of the 16 group tags, the slots a job's keys live in;"
        " jobs: the share of the run's jobs whose group that primary serves):\n\n"
        + "\n".join(spread)
        + "\n\n"
        + "\n".join(totals)
        + "\n\n"
        f"On the two primaries without the limiter, the shares of commands were"
        f" {' and '.join(f'{command_shares[i]:.1%}' for i in others)} for"
        f" {' and '.join(f'{job_shares[i]:.1%}' for i in others)} of the jobs. The primary serving `{{limit}}` (the"
        " limiter's slot: its scripts run there)"
        f" took {extra[0] * 100:+.1f} points of the commands above its share of the jobs ({extra_cmds:+.1f}"
        f" commands per job), {extra[1] * 100:+.1f} points of the command time and {extra[2] * 100:+.1f} of the"
        f" CPU. Per job,"
        f" the cluster and its broker ran {both:.1f} commands against {single[0]:.1f} on one Redis ({ratio:.2f}x);"
        f" of the cluster's, the ones a single Redis never gets (per job, all primaries):"
        f" {only_text or 'none'}. {lost_text}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--fragments", type=int, default=50, help="F: fragments per job")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args()
    started = time.monotonic()
    rounds = [one_round(args.fragments, args.jobs, i + 1) for i in range(args.rounds)]
    text = section(rounds, args, time.monotonic() - started)
    if not args.no_write:
        write_section(args.out, SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
