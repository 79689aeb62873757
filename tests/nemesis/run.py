"""One seed end to end (``run_seed``), and ``python -m tests.nemesis.run`` for many (``make chaos``).

A seed's run: start the cluster and the followers; submit ``jobs`` jobs over about
``0.3 s x jobs`` while the nemesis strikes; heal everything; give every job time to end and the
broker time to drain; read the final state; check it. Logs of every node process, the simulator's
books, the history and the report stay in the seed's work directory.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from moonq.broker import QueueDepth, queue_lists
from moonq.eventlog import read_log
from moonq.record import TERMINAL_STATUSES, decode_hash
from tests.helpers import unbounded_keys
from tests.nemesis.checker import Final, check
from tests.nemesis.cluster import VISIBILITY_TIMEOUT_S, Cluster, ClusterConfig
from tests.nemesis.history import History, Observer
from tests.nemesis.nemesis import Nemesis
from tests.nemesis.report import SECTION, SeedReport, recoveries, section, write_json
from tests.nemesis.workload import Workload

# After the last fault healed, jobs get to end for as long as they keep ending: a backlog of 500 jobs
# behind an in-flight cap of 8 takes minutes, and only a run where no job ended for STALL_S (or that
# passed SETTLE_MAX_S) is stuck. Then the broker gets DRAIN_S to hand back and drain what a dead or paused
# node held (a few visibility timeouts plus kombu's 2 s restore interval).
STALL_S = 60.0
SETTLE_MAX_S = 1200.0
DRAIN_S = VISIBILITY_TIMEOUT_S * 4 + 5


@dataclass
class RunConfig:
    seed: int = 1
    jobs: int = 100
    broker: str = "redis"
    nodes: int = 3
    duration_s: float | None = None  # the submitting phase; default 0.3 s per job, at least 25 s
    workdir: Path | None = None

    @property
    def submit_s(self) -> float:
        return self.duration_s if self.duration_s is not None else max(25.0, 0.3 * self.jobs)


def run_seed(cfg: RunConfig) -> SeedReport:
    """Run one seed and check it; the report lists every violation (it never raises for one)."""
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix=f"moonq-nemesis-{cfg.seed}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)  # nothing should draw from the global generator; if something does, it is seeded too
    started = time.monotonic()
    history = History()
    cluster_cfg = ClusterConfig(broker=cfg.broker, nodes=cfg.nodes, seed=cfg.seed)
    with Cluster(cluster_cfg, workdir) as cluster:
        observer = Observer(cluster.settings, history).start()
        try:
            _drive(cluster, history, observer, cfg)
            _settle(cluster, history, observer)
            final = collect(cluster, history)
        finally:
            observer.stop()
    violations = check(history, final)
    report = _report(cfg, history, final, violations, time.monotonic() - started, str(workdir))
    write_json(report, workdir / "report.json")
    dump_history(history, final, workdir / "history.json")
    return report


def _drive(cluster: Cluster, history: History, observer: Observer, cfg: RunConfig) -> None:
    workload = Workload(cluster, history, observer, cfg.seed, cfg.jobs, cfg.submit_s)
    nemesis = Nemesis(cluster, history, cfg.seed)
    threads = [
        threading.Thread(target=workload.run, name="workload"),
        threading.Thread(target=nemesis.run, name="nemesis"),
    ]
    for thread in threads:
        thread.start()
    try:
        workload.done.wait()
    finally:
        nemesis.stop.set()
        threads[1].join(timeout=120)
        nemesis.finish()
        threads[0].join(timeout=120)
    history.note("nemesis finished; every fault healed")


def _settle(cluster: Cluster, history: History, observer: Observer) -> None:
    """Wait for every job to end (while they keep ending: ``STALL_S``), then for the broker to drain (``DRAIN_S``)."""
    r = redis.Redis.from_url(cluster.redis.url)
    try:
        started = last_progress = time.monotonic()
        job_ids = list(history.job_ids())
        ended = -1
        while time.monotonic() - last_progress < STALL_S and time.monotonic() - started < SETTLE_MAX_S:
            cluster.check_nodes()
            with r.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hget(cluster.settings.keys.job(job_id), "status")
                statuses = pipe.execute()
            now_ended = sum(1 for s in statuses if s is not None and s.decode() in TERMINAL_STATUSES)
            if now_ended == len(job_ids):
                break
            if now_ended > ended:
                ended, last_progress = now_ended, time.monotonic()
            time.sleep(0.5)
        deadline = time.monotonic() + STALL_S
        observer.wait(job_ids, max(5.0, deadline - time.monotonic()))
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline and any(broker_residue(cluster, r).values()):
            time.sleep(0.5)
    finally:
        r.close()


def broker_residue(cluster: Cluster, r: redis.Redis) -> dict[str, Any]:
    """Messages still queued, and (Redis broker) delivered but never acknowledged, by job id."""
    settings = cluster.settings
    if cluster.rabbit is not None:
        depth = QueueDepth(settings)
        try:
            return {"queued": depth.read() or 0}
        finally:
            depth.close()
    queued = sum(int(r.llen(name)) for name in queue_lists(settings))
    unacked: list[str] = []
    raws: list[bytes] = r.hvals(f"{settings.keys.broker_prefix}unacked")  # type: ignore[assignment]
    for raw in raws:
        try:
            unacked.append(str(json.loads(raw)[0]["headers"]["id"]))
        except (ValueError, KeyError, IndexError, TypeError):
            unacked.append(raw.decode(errors="replace")[:80])
    return {"queued": queued, "unacked": sorted(unacked)}


def collect(cluster: Cluster, history: History) -> Final:
    """The final state, read straight from Redis, the simulator and the nodes."""
    assert cluster.sim is not None
    settings = cluster.settings
    keys = settings.keys
    r = redis.Redis.from_url(cluster.redis.url)
    try:
        ids = {k.decode().partition("}:")[2] for k in r.scan_iter(match=f"{keys.prefix}:job:*", count=1000)}
        ids |= set(history.job_ids())
        records = {job_id: decode_hash(r.hgetall(keys.job(job_id))) for job_id in ids}
        records = {job_id: rec for job_id, rec in records.items() if rec}
        logs = {job_id: read_log(r, keys, job_id) for job_id in ids}
        residue = broker_residue(cluster, r)
        unbounded = unbounded_keys(r, settings.prefix)
    finally:
        r.close()
    return Final(
        records=records,
        logs=logs,
        calls=cluster.sim.tap.snapshot(),
        sim_stats=cluster.sim.stats(),
        max_inflight=cluster.cfg.max_inflight,
        unbounded=unbounded,
        broker_residue=residue,
        deliveries=cluster.deliveries(),
        node_exits=[
            {k: v for k, v in e.items() if k != "log_tail"} | {"log_tail": e["log_tail"][-600:]}
            for e in cluster.unexpected_exits()
        ],
    )


def _report(
    cfg: RunConfig, history: History, final: Final, violations: list[Any], duration_s: float, workdir: str
) -> SeedReport:
    job_ids = history.job_ids()
    outcomes = Counter(final.records.get(j, {}).get("status", "missing") for j in job_ids)
    return SeedReport(
        seed=cfg.seed,
        broker=cfg.broker,
        nodes=cfg.nodes,
        jobs=len(job_ids),
        submits=len(history.submits),
        outcomes=outcomes,
        faults=history.faults_by_kind(),
        violations=violations,
        recoveries=recoveries(history),
        duration_s=duration_s,
        upstream_calls=len(final.calls),
        sim_faults=dict(final.sim_stats.get("by_fault") or {}),
        cancels=sum(1 for c in history.cancels if c.returned),
        workdir=workdir,
    )


def dump_history(history: History, final: Final, path: Path) -> None:
    """The raw material, for a human after a failing seed: what was done, and what the upstream saw."""
    with history.lock:
        data = {
            "submits": [vars(s) for s in history.submits],
            "cancels": [vars(c) for c in history.cancels],
            "faults": [vars(f) for f in history.faults],
            "notes": history.notes,
            "follower_errors": history.follower_errors,
            "calls": [c.as_json() for c in final.calls],
            "sim": {k: v for k, v in final.sim_stats.items() if k != "admitted"},
        }
    path.write_text(json.dumps(data, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.nemesis.run", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="how many seeds (1, 2, ... unless --first-seed)")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=500, help="jobs per seed")
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(".bench/chaos"), help="per-seed logs, history and report")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="where the Chaos section goes")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    from bench.report import write_section  # only the CLI writes BENCHMARKS.md

    reports = []
    started = time.monotonic()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cfg = RunConfig(
            seed=seed, jobs=args.jobs, broker=args.broker, nodes=args.nodes, workdir=args.workdir / f"seed-{seed}"
        )
        report = run_seed(cfg)
        reports.append(report)
        print(report.summary(), flush=True)
        for violation in report.violations[:10]:
            print(f"    {violation.line()[:400]}", flush=True)
    total_s = time.monotonic() - started
    command = f"python -m tests.nemesis.run --seeds {args.seeds} --jobs {args.jobs}" + (
        f" --broker {args.broker}" if args.broker != "redis" else ""
    )
    if not args.no_write:
        write_section(args.out, SECTION, section(reports, command, total_s))
        print(f"wrote the Chaos section of {args.out}")
    return 1 if any(r.violations for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
